package bench

import (
	"context"
	"runtime"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/verify"
)

// BenchmarkVerify: b.N rows (104-byte values, 1000 keys, 3 partitions) are
// published by the relay, then `verify` reconciles them; the clock runs for
// verify only. It reports rows/s and the peak Go heap during the run (heap
// sampled every 10 ms), which is what "memory bounded" means: about 50 bytes
// a row plus the fetch buffers.
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

	runtime.GC()
	var base runtime.MemStats
	runtime.ReadMemStats(&base)
	var peak atomic.Uint64
	stop := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		t := time.NewTicker(10 * time.Millisecond)
		defer t.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			if m.HeapInuse > peak.Load() {
				peak.Store(m.HeapInuse)
			}
			select {
			case <-stop:
				return
			case <-t.C:
			}
		}
	}()
	b.ResetTimer()
	b.StartTimer()
	start := time.Now()
	rep, err := verify.Run(context.Background(), verify.Config{Pool: db.Pool, Table: db.Table, Brokers: k.Brokers, Since: time.Hour})
	elapsed := time.Since(start)
	b.StopTimer()
	close(stop)
	<-sampled
	if err != nil {
		b.Fatal(err)
	}
	if !rep.Clean() || rep.Published != b.N || rep.Records != b.N {
		b.Fatalf("verify: published %d records %d counts %v", rep.Published, rep.Records, rep.Counts)
	}
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "rows/s")
	b.ReportMetric(float64(peak.Load()-min(peak.Load(), base.HeapInuse))/(1<<20), "peak-heap-MiB")
	b.ReportMetric(elapsed.Seconds(), "s")
}
