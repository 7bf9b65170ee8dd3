package bench

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// BenchmarkCeiling compares the relay with the database-only ceiling on the
// same rows: a loop with no Kafka at all (read a batch of every column in id
// order, mark it published, repeat; one loop per shard, with the relay's
// shard filter) drains BENCH_CEILING_ROWS freshly loaded rows (default
// 200000), then the relay drains the same number of freshly loaded rows, in
// turns, BENCH_CEILING_ROUNDS times (default 3). It reports the median rate of
// each and their ratio (relay/ceiling). The machine is shared and noisy:
// compare ratios, measured side by side.
//
// The sub-benchmarks cover delivery modes, batch sizes, row sizes (200 B,
// 1 KiB, 10 KiB) and 1 or 4 shards; pick with -bench, for example
//
//	go test -run '^$' -bench 'Ceiling/exactly-once/batch=1000/row=200/' -benchtime 1x -timeout 60m ./bench/
func BenchmarkCeiling(b *testing.B) {
	rows := envInt(b, "BENCH_CEILING_ROWS", 200000)
	rounds := envInt(b, "BENCH_CEILING_ROUNDS", 3)
	for _, mode := range []string{"exactly-once", "at-least-once", "at-most-once"} {
		for _, batch := range []int{100, 1000, 5000} {
			for _, size := range []int{200, 1024, 10240} {
				for _, shards := range []int{1, 4} {
					name := fmt.Sprintf("%s/batch=%d/row=%d/shards=%d", mode, batch, size, shards)
					b.Run(name, func(b *testing.B) {
						ceiling(b, mode, batch, size, shards, rows, rounds)
					})
				}
			}
		}
	}
}

func ceiling(b *testing.B, mode string, batch, size, shards, rows, rounds int) {
	b.StopTimer()
	db := testenv.NewDB(b)
	k := testenv.NewKafka(b, 3, topic)
	var dbRates, relayRates, serialRates []float64
	for range rounds {
		for range b.N {
			load(b, db, rows, size)
			dbRates = append(dbRates, float64(rows)/drainDatabaseOnly(b, db, batch, shards).Seconds())
			load(b, db, rows, size)
			relayRates = append(relayRates, float64(rows)/drainRelay(b, db, k, mode, batch, shards, rows).Seconds())
			// The same relay with the pipeline off: what the pipeline buys,
			// on the same rows in the same run.
			load(b, db, rows, size)
			serialRates = append(serialRates, float64(rows)/drainRelay(b, db, k, mode, batch, shards, rows, relay.WithSerialLoop()).Seconds())
		}
	}
	db1, r1, s1 := median(dbRates), median(relayRates), median(serialRates)
	b.ReportMetric(db1, "ceiling-rows/s")
	b.ReportMetric(r1, "relay-rows/s")
	b.ReportMetric(r1/db1, "ratio")
	b.ReportMetric(s1, "serial-rows/s")
	b.ReportMetric(s1/db1, "serial-ratio")
}

// load empties the outbox and writes n rows of size bytes (keys over 1000
// accounts) with COPY, then vacuums, so that every round starts alike.
func load(b *testing.B, db *testenv.DB, n, size int) {
	b.Helper()
	ctx := context.Background()
	if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		b.Fatal(err)
	}
	v := make([]byte, size)
	for i := range v {
		v[i] = 'a' + byte(i%26)
	}
	for done := 0; done < n; {
		m := min(n-done, 10000)
		msgs := messages(m)
		for i := range msgs {
			msgs[i].Value = v
		}
		if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
			b.Fatal(err)
		}
		done += m
	}
	if _, err := db.Pool.Exec(ctx, `VACUUM ANALYZE outbox`); err != nil {
		b.Fatal(err)
	}
}

// drainDatabaseOnly is the ceiling: per shard, read a batch of every column
// in id order with the relay's shard filter, mark it published, until none
// is left.
func drainDatabaseOnly(b *testing.B, db *testenv.DB, batch, shards int) time.Duration {
	b.Helper()
	ctx := context.Background()
	filter := ""
	if shards > 1 {
		filter = ` AND (CASE WHEN key IS NULL THEN id % $2 ELSE (hashtextextended(encode(key, 'hex'), 0) % $2 + $2) % $2 END) = $3`
	}
	start := time.Now()
	var wg sync.WaitGroup
	for s := range shards {
		wg.Go(func() {
			for {
				args := []any{batch}
				if shards > 1 {
					args = append(args, int64(shards), int64(s))
				}
				rows, err := db.Pool.Query(ctx, `SELECT id, topic, key, value, headers::text, partition, created_at FROM outbox WHERE published_at IS NULL`+
					filter+` ORDER BY id LIMIT $1`, args...)
				if err != nil {
					b.Error(err)
					return
				}
				var ids []int64
				var (
					id      int64
					t       string
					key, v  []byte
					h       *string
					p       *int32
					created time.Time
				)
				if _, err := pgx.ForEachRow(rows, []any{&id, &t, &key, &v, &h, &p, &created}, func() error {
					ids = append(ids, id)
					return nil
				}); err != nil {
					b.Error(err)
					return
				}
				if len(ids) == 0 {
					return
				}
				if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL`, ids); err != nil {
					b.Error(err)
					return
				}
			}
		})
	}
	wg.Wait()
	return time.Since(start)
}

// drainRelay starts a relay on the loaded rows and times it until it has
// published them all (counted once marked).
func drainRelay(b *testing.B, db *testenv.DB, k *testenv.Kafka, mode string, batch, shards, rows int, opts ...relay.Option) time.Duration {
	b.Helper()
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = mode
	cfg.BatchSize = batch
	cfg.Shards = shards
	cfg.RelayName, cfg.CheckpointTopic = "bench-relay", "bench-checkpoints" // one relay identity per table
	cfg.PollInterval = time.Second
	reg := prometheus.NewRegistry()
	start := time.Now()
	run := testenv.StartRelay(b, db, cfg, append([]relay.Option{relay.WithRegisterer(reg)}, opts...)...)
	deadline := start.Add(10 * time.Minute)
	for published(b, reg) < rows {
		if time.Now().After(deadline) {
			b.Fatalf("%d of %d rows published after %v", published(b, reg), rows, time.Since(start))
		}
		time.Sleep(2 * time.Millisecond)
	}
	elapsed := time.Since(start)
	if err := run.Stop(); err != nil {
		b.Fatal(err)
	}
	return elapsed
}
