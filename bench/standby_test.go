package bench

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// BenchmarkStandbyNamesCost: what OUTBOX_STANDBY_NAMES costs, side by side
// with it off, on one private primary with one asynchronous streaming
// standby (same machine): commit-to-consume latency at
// BENCH_LATENCY_RATE rows/s (default 2000) for BENCH_LATENCY_SECONDS
// (default 10), and a drain of BENCH_STANDBY_ROWS (default 100000) 200-byte
// rows, batch 500. Variants alternate each round; it reports medians.
//
//	go test -run '^$' -bench StandbyNamesCost -benchtime 3x ./bench/
func BenchmarkStandbyNamesCost(b *testing.B) {
	rate := envInt(b, "BENCH_LATENCY_RATE", 2000)
	seconds := envInt(b, "BENCH_LATENCY_SECONDS", 10)
	rows := envInt(b, "BENCH_STANDBY_ROWS", 100000)
	ctx := context.Background()
	pg := testenv.StartPrivatePostgres(b, "max_connections=100", "shared_buffers=256MB")
	url := pg.URL("postgres", "postgres")
	pool, err := relay.OpenPool(ctx, url, 12, nil)
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close()
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		b.Fatal(err)
	}
	pg.StartStandby(b, "stb1")
	k := testenv.NewKafka(b, 3, topic)
	db := &testenv.DB{URL: url, Pool: pool, Table: outbox.DefaultTable}
	type result struct{ p50, p99, rate []float64 }
	res := map[string]*result{"off": {}, "on": {}}
	base := testenv.RelayConfig(db, k)
	base.BatchSize = 500
	base.PollInterval = time.Second
	base.LogLevel = "info"
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	for i := range b.N {
		order := []string{"off", "on"}
		if i%2 == 1 {
			order = []string{"on", "off"}
		}
		for _, variant := range order {
			cfg := base
			if variant == "on" {
				cfg.StandbyNames = []string{"stb1"}
			}
			lat, err := loadtest.Latency(ctx, loadtest.LatencyConfig{Pool: pool, Relay: cfg, Topic: topic, Rate: rate, Duration: time.Duration(seconds) * time.Second, RowBytes: 200})
			if err != nil {
				b.Fatal(err)
			}
			if !lat.ExactlyOnce() {
				b.Fatalf("%s: %d missing, %d duplicates", variant, lat.Missing, lat.Duplicates)
			}
			if err := loadtest.Load(ctx, pool, outbox.DefaultTable, topic, rows, 200); err != nil {
				b.Fatal(err)
			}
			d, err := loadtest.DrainRelay(ctx, pool, cfg, rows, 0)
			if err != nil {
				b.Fatal(err)
			}
			r := res[variant]
			r.p50, r.p99, r.rate = append(r.p50, ms(lat.P50)), append(r.p99, ms(lat.P99)), append(r.rate, d.SteadyRate())
			b.Logf("round %d %s: latency at %.0f rows/s p50 %.2f ms p99 %.2f ms; drain of %d rows %.0f rows/s steady", i, variant, lat.Rate, ms(lat.P50), ms(lat.P99), rows, d.SteadyRate())
			if _, err := pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
				b.Fatal(err)
			}
		}
	}
	for _, v := range []string{"off", "on"} {
		b.ReportMetric(median(res[v].p50), v+"-p50-ms")
		b.ReportMetric(median(res[v].p99), v+"-p99-ms")
		b.ReportMetric(median(res[v].rate), v+"-rows/s")
	}
	b.ReportMetric(median(res["on"].rate)/median(res["off"].rate), "on/off-throughput")
}
