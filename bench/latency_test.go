package bench

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/relay"
)

// BenchmarkLatencyAtRate: commit-to-consume latency at a steady write rate,
// the latency phase of `outbox-relay bench` (loadtest.Latency). Eight
// writers commit single-row transactions (200-byte values, 1000 keys) at
// BENCH_LATENCY_RATE rows a second in all (default 2000), spread evenly, for
// BENCH_LATENCY_SECONDS (default 10), while one relay (exactly-once, one
// shard, batch 500, the production poll interval) publishes them to kfake
// with 3 brokers over TCP, and a read_committed consumer polls them. The
// clock of a row runs from just before its COMMIT until the consumer polled
// its record. It reports p50, p90, p99 and max in ms (medians over b.N
// runs), and fails unless every row arrived exactly once.
//
//	go test -run '^$' -bench LatencyAtRate -benchtime 1x ./bench/
func BenchmarkLatencyAtRate(b *testing.B) {
	rate := envInt(b, "BENCH_LATENCY_RATE", 2000)
	seconds := envInt(b, "BENCH_LATENCY_SECONDS", 10)
	ctx := context.Background()
	db := testenv.NewDB(b)
	k := testenv.NewKafka(b, 3, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = 500
	cfg.PollInterval = time.Second
	cfg.LogLevel = "info"
	pool, err := relay.OpenPool(ctx, db.URL, 12, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	var p50, p90, p99, mx, achieved []float64
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for range b.N {
		res, err := loadtest.Latency(ctx, loadtest.LatencyConfig{
			Pool: pool, Relay: cfg, Topic: topic, Rate: rate, Duration: time.Duration(seconds) * time.Second, RowBytes: 200,
		})
		if err != nil {
			b.Fatal(err)
		}
		if !res.ExactlyOnce() {
			b.Fatalf("%d rows missing, %d duplicates", res.Missing, res.Duplicates)
		}
		b.Logf("%d rows at %.0f rows/s (writers at most %.1f ms behind): p50 %.2f ms, p90 %.2f ms, p99 %.2f ms, max %.2f ms",
			res.Rows, res.Rate, ms(res.Behind), ms(res.P50), ms(res.P90), ms(res.P99), ms(res.Max))
		p50, p90, p99, mx = append(p50, ms(res.P50)), append(p90, ms(res.P90)), append(p99, ms(res.P99)), append(mx, ms(res.Max))
		achieved = append(achieved, res.Rate)
	}
	b.ReportMetric(median(p50), "p50-ms")
	b.ReportMetric(median(p90), "p90-ms")
	b.ReportMetric(median(p99), "p99-ms")
	b.ReportMetric(median(mx), "max-ms")
	b.ReportMetric(median(achieved), "rows/s")
}
