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

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// BenchmarkRelayRSS: b.N rows of 1 KiB values (keys over 1000 accounts) are
// loaded with COPY, then the built relay binary (`outbox-relay run`, in its
// own process, default settings: exactly-once, one shard, OUTBOX_BATCH_SIZE
// 500) drains them into an in-process kfake cluster (3 partitions) over
// TCP. The clock runs from the process's start until no row is unpublished.
// It reports the relay process's peak RSS (VmHWM, read from /proc while it
// runs: the broker's memory is this process's, not the relay's) and rows/s.
// The binary is built as deploy/Dockerfile builds it (CGO_ENABLED=0,
// -trimpath, -ldflags "-s -w"); OUTBOX_BENCH_RELAY_BIN=path measures that
// binary instead (an older build, to compare).
// kfake subscribes every client to all its KIP-714 metrics, as a broker with
// a client-telemetry plugin does; OUTBOX_BENCH_BROKER_TELEMETRY=none answers
// as a stock Apache Kafka broker does instead (no subscription).
// OUTBOX_BENCH_RELAY_ENV adds settings (space-separated NAME=value) to the
// relay's environment; OUTBOX_BENCH_BATCH_SIZE sets the relay's batch size;
// OUTBOX_BENCH_RELAY_LOG=path keeps the relay's log there (GODEBUG and the
// other variables of this process, except OUTBOX_*, reach the relay).
//
//	go test -run '^$' -bench RelayRSS -benchtime 1000000x -timeout 60m ./bench/
func BenchmarkRelayRSS(b *testing.B) {
	b.StopTimer()
	ctx := context.Background()
	const valueSize = 1 << 10
	db := testenv.NewDB(b)
	rssTopic := "bench-rss"
	k := testenv.NewKafka(b, 3, rssTopic)
	if os.Getenv("OUTBOX_BENCH_BROKER_TELEMETRY") == "none" && k.Cluster != nil {
		// As a broker without a client-telemetry plugin (stock Apache
		// Kafka): no client is subscribed to its own metrics. kfake
		// otherwise subscribes every client to all of them.
		k.Cluster.ControlKey(kmsg.GetTelemetrySubscriptions.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
			k.Cluster.KeepControl()
			resp := req.(*kmsg.GetTelemetrySubscriptionsRequest).ResponseKind().(*kmsg.GetTelemetrySubscriptionsResponse)
			resp.PushIntervalMillis = 300000
			return resp, nil, true
		})
	}
	v := make([]byte, valueSize)
	for i := range v {
		v[i] = 'a' + byte(i%26)
	}
	for done := 0; done < b.N; {
		m := min(b.N-done, 10000)
		msgs := make([]outbox.Message, m)
		for i := range msgs {
			msgs[i] = outbox.Message{Topic: rssTopic, Key: []byte("acct-" + strconv.Itoa((done+i)%1000)), Value: v}
		}
		// WriteMany uses COPY from outbox.CopyThreshold rows.
		if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
			b.Fatal(err)
		}
		done += m
	}
	if _, err := db.Pool.Exec(ctx, `VACUUM ANALYZE outbox`); err != nil {
		b.Fatal(err)
	}

	bin := os.Getenv("OUTBOX_BENCH_RELAY_BIN")
	if bin == "" {
		bin = filepath.Join(b.TempDir(), "outbox-relay")
		// Built as deploy/Dockerfile builds the shipped binary: static,
		// without cgo's libc and its allocator, and without symbols.
		build := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", bin, "../cmd/outbox-relay")
		build.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := build.CombinedOutput(); err != nil {
			b.Fatalf("build: %v\n%s", err, out)
		}
	}
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			env = append(env, kv)
		}
	}
	env = append(env, "OUTBOX_DATABASE_URL="+db.URL, "OUTBOX_KAFKA_BROKERS="+strings.Join(k.Brokers, ","),
		"OUTBOX_METRICS_ADDR="+metricsAddr(), "OUTBOX_LOG_LEVEL=warn", "OUTBOX_RETENTION=0")
	if os.Getenv("OUTBOX_BENCH_PPROF") == "true" {
		env = append(env, "OUTBOX_PPROF=true")
	}
	// More settings of the relay's, e.g.
	// OUTBOX_BENCH_RELAY_ENV="OUTBOX_KAFKA_ENABLE_METRICS_PUSH=false OUTBOX_RECOVERY_WINDOW=1".
	env = append(env, strings.Fields(os.Getenv("OUTBOX_BENCH_RELAY_ENV"))...)
	if n := os.Getenv("OUTBOX_BENCH_BATCH_SIZE"); n != "" {
		env = append(env, "OUTBOX_BATCH_SIZE="+n)
	}
	logPath := filepath.Join(b.TempDir(), "relay.log")
	if keep := os.Getenv("OUTBOX_BENCH_RELAY_LOG"); keep != "" {
		logPath = keep
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		b.Fatal(err)
	}
	defer logFile.Close()
	cmd := exec.Command(bin, "run")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = logFile, logFile
	b.ResetTimer()
	b.StartTimer()
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stopped := false
	defer func() {
		if !stopped {
			_ = cmd.Process.Kill()
		}
	}()
	peakRSS := watchPeakRSS(cmd.Process.Pid)
	deadline := time.Now().Add(50 * time.Minute)
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
			stopped = true
			log, _ := os.ReadFile(logFile.Name())
			b.Fatalf("the relay exited before publishing every row: %v\n%s", err, log)
		case <-time.After(100 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			b.Fatal("the relay did not publish every row in 50 minutes")
		}
	}
	elapsed := time.Since(start)
	b.StopTimer()
	maxRSS := peakRSS()
	_ = cmd.Process.Signal(syscall.SIGTERM)
	err = <-exited
	stopped = true
	if err != nil {
		log, _ := os.ReadFile(logFile.Name())
		b.Fatalf("the relay did not stop cleanly on SIGTERM: %v\n%s", err, log)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "rows/s")
	b.ReportMetric(maxRSS, "max-RSS-MiB")
	b.ReportMetric(elapsed.Seconds(), "s")
}

// metricsAddr is where the benchmarked relay serves its metrics (and
// /debug/pprof/ with OUTBOX_PPROF=true, set in this process's environment as
// OUTBOX_BENCH_PPROF=true): OUTBOX_BENCH_METRICS_ADDR, or a free port.
func metricsAddr() string {
	if a := os.Getenv("OUTBOX_BENCH_METRICS_ADDR"); a != "" {
		return a
	}
	return "127.0.0.1:0"
}
