package bench

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/verify"
)

// BenchmarkVerify: b.N rows (104-byte values, 1000 keys, 3 partitions) are
// published by the relay, then `outbox-relay verify` (the binary, in its own
// process) reconciles them; the clock runs for verify only. It reports rows/s
// and verify's peak RSS: one small entry per row of the window, plus the
// fetch buffers.
//
//	go test -run '^$' -bench Verify -benchtime 1000000x -timeout 30m ./bench/
func BenchmarkVerify(b *testing.B) {
	b.StopTimer()
	db := testenv.NewDB(b)
	k := testenv.NewKafka(b, 3, topic)
	insert(b, db, b.N)
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = 1000
	reg := prometheus.NewRegistry()
	run := testenv.StartRelay(b, db, cfg, relay.WithRegisterer(reg))
	deadline := time.Now().Add(30 * time.Minute)
	for published(b, reg) < b.N && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if err := run.Stop(); err != nil {
		b.Fatal(err)
	}

	// verify runs as the binary, in a process of its own, so that its
	// peak RSS is its own (the kfake broker lives in this process).
	bin := filepath.Join(b.TempDir(), "outbox-relay")
	if out, err := exec.Command("go", "build", "-o", bin, "../cmd/outbox-relay").CombinedOutput(); err != nil {
		b.Fatalf("build: %v\n%s", err, out)
	}
	cmd := exec.Command(bin, "verify", "-json", "-since", "1h")
	cmd.Env = append(os.Environ(), "OUTBOX_DATABASE_URL="+db.URL, "OUTBOX_KAFKA_BROKERS="+strings.Join(k.Brokers, ","))
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	b.ResetTimer()
	b.StartTimer()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	// The peak RSS of verify's own memory: VmHWM of its process, read
	// while it runs (a vforked child's rusage would count this process).
	peakRSS := watchPeakRSS(cmd.Process.Pid)
	err := cmd.Wait()
	elapsed := time.Since(start)
	b.StopTimer()
	maxRSS := peakRSS()
	if err != nil {
		b.Fatalf("verify: %v\n%s", err, stderr.String())
	}
	var rep verify.Report
	if err := json.Unmarshal(stdout.Bytes(), &rep); err != nil {
		b.Fatal(err)
	}
	if !rep.Clean() || rep.Published != b.N || rep.Records != b.N {
		b.Fatalf("verify: published %d records %d counts %v", rep.Published, rep.Records, rep.Counts)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "rows/s")
	b.ReportMetric(maxRSS, "max-RSS-MiB")
	b.ReportMetric(elapsed.Seconds(), "s")
}
