package bench

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// BenchmarkOversizeRowRSS: one row of a 200 MiB value among 1,000 small
// ones (100-byte values, keys over 100 accounts; the large row keyless, so
// that it holds no key's later rows, in the middle, id 501), drained by the built relay binary (`outbox-relay run`,
// its own process, default settings: exactly-once, one shard,
// OUTBOX_KAFKA_BATCH_SIZE 1 MiB) into an in-process kfake cluster over TCP.
// The large row can never be a record (it passes batch.size): it is
// dead-lettered, the others published. It reports the relay process's peak
// RSS (VmHWM from /proc) and the time until no row is unpublished.
// OUTBOX_BENCH_OVERSIZE_MIB sets the large value's size (default 200);
// OUTBOX_BENCH_RELAY_BIN=path measures that binary instead (an older
// build, to compare). The value is written by the server (repeat(), so
// TOAST stores it compressed; the relay would receive it uncompressed).
//
//	go test -run '^$' -bench OversizeRowRSS -benchtime 1x -timeout 20m ./bench/
func BenchmarkOversizeRowRSS(b *testing.B) {
	b.StopTimer()
	ctx := context.Background()
	mib := 200
	if v := os.Getenv("OUTBOX_BENCH_OVERSIZE_MIB"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 {
			b.Fatalf("OUTBOX_BENCH_OVERSIZE_MIB=%q: expected a positive number of MiB", v)
		}
		mib = n
	}
	bin := os.Getenv("OUTBOX_BENCH_RELAY_BIN")
	if bin == "" {
		bin = filepath.Join(b.TempDir(), "outbox-relay")
		build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "../cmd/outbox-relay")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			b.Fatalf("build: %v\n%s", err, out)
		}
	}
	var rss, secs float64
	for range b.N {
		db := testenv.NewDB(b)
		topic := "bench-oversize"
		k := testenv.NewKafka(b, 3, topic)
		if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value)
SELECT $1, CASE WHEN n <> 501 THEN convert_to('acct-' || n % 100, 'UTF8') END, CASE WHEN n = 501 THEN convert_to(repeat('x', $2::int << 20), 'UTF8') ELSE convert_to(repeat('v', 100), 'UTF8') END
FROM generate_series(1, 1001) AS n ORDER BY n`, topic, mib); err != nil {
			b.Fatal(err)
		}
		var env []string
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "OUTBOX_") {
				env = append(env, kv)
			}
		}
		env = append(env, "OUTBOX_DATABASE_URL="+db.URL, "OUTBOX_KAFKA_BROKERS="+strings.Join(k.Brokers, ","),
			"OUTBOX_METRICS_ADDR=127.0.0.1:0", "OUTBOX_LOG_LEVEL=warn", "OUTBOX_RETENTION=0")
		logFile, err := os.CreateTemp(b.TempDir(), "relay-*.log")
		if err != nil {
			b.Fatal(err)
		}
		cmd := exec.Command(bin, "run")
		cmd.Env = env
		cmd.Stdout, cmd.Stderr = logFile, logFile
		b.StartTimer()
		start := time.Now()
		if err := cmd.Start(); err != nil {
			b.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		peakRSS := watchPeakRSS(cmd.Process.Pid)
		deadline := time.Now().Add(10 * time.Minute)
		for {
			var left bool
			if err := db.Pool.QueryRow(ctx, `SELECT EXISTS (SELECT FROM outbox WHERE published_at IS NULL)`).Scan(&left); err != nil {
				b.Fatal(err)
			}
			if !left {
				break
			}
			select {
			case err := <-exited:
				log, _ := os.ReadFile(logFile.Name())
				b.Fatalf("the relay exited before every row was published or dead-lettered: %v\n%s", err, log)
			case <-time.After(100 * time.Millisecond):
			}
			if time.Now().After(deadline) {
				_ = cmd.Process.Kill()
				log, _ := os.ReadFile(logFile.Name())
				b.Fatalf("rows left unpublished after 10 minutes\n%s", log)
			}
		}
		secs += time.Since(start).Seconds()
		b.StopTimer()
		rss = max(rss, peakRSS())
		_ = cmd.Process.Signal(syscall.SIGTERM)
		if err := <-exited; err != nil {
			log, _ := os.ReadFile(logFile.Name())
			b.Fatalf("the relay did not stop cleanly on SIGTERM: %v\n%s", err, log)
		}
		logFile.Close()
		var dead int
		if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox_dead_letter WHERE id = 501 AND octet_length(value) = $1::bigint << 20`, mib).Scan(&dead); err != nil || dead != 1 {
			b.Fatalf("the large row is not in the dead-letter table with its value: %d %v", dead, err)
		}
	}
	b.ReportMetric(rss, "max-RSS-MiB")
	b.ReportMetric(secs/float64(b.N), "s")
}
