package bench

import (
	"cmp"
	"context"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// BenchmarkCeiling compares the relay with the database-only ceiling on the
// same rows: a loop with no Kafka at all (read a batch of every column in id
// order, mark it published, repeat; one loop per shard, with the relay's
// shard filter) drains freshly loaded rows, then the relay drains the same
// number of freshly loaded rows, then the relay with its pipeline off
// (relay.WithSerialLoop), in turns, BENCH_CEILING_ROUNDS times (default 3).
// It reports the median rate of each and their ratios to the ceiling. Then,
// in the same rounds, the same for OUTBOX_ON_PUBLISH=delete: the ceiling of
// a loop that deletes its batches instead of marking them
// (ceiling-delete-rows/s) and the relay in delete mode (relay-delete-rows/s,
// delete-ratio). The machine is shared and noisy: compare ratios, measured
// side by side.
//
// BENCH_CEILING_LOOPS (default "serial,delete") picks the loops run besides
// the ceiling and the relay: "none" runs only those two (the matrix).
//
// The loops are package loadtest's, the ones `outbox-relay bench` runs. With
// several shards the table has its shard index, as `migrate up` builds it.
// Rows are a byte budget: BENCH_CEILING_ROWS (default 200000) rows of 200
// bytes, proportionally fewer of larger rows (at least 5000, or
// BENCH_CEILING_ROWS if smaller), so a 10 KiB run loads about as many bytes
// as a 200-byte one.
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
						ceiling(b, mode, batch, size, shards, rowsFor(rows, size), rounds)
					})
				}
			}
		}
	}
}

// rowsFor scales the row count of 200-byte rows to rows of size bytes: the
// same bytes, with a floor of 5000 rows (or rows, if fewer).
func rowsFor(rows, size int) int {
	return max(min(rows, 5000), rows*200/size)
}

func ceiling(b *testing.B, mode string, batch, size, shards, rows, rounds int) {
	b.StopTimer()
	loops := map[string]bool{}
	for _, l := range strings.Split(cmp.Or(os.Getenv("BENCH_CEILING_LOOPS"), "serial,delete"), ",") {
		switch l = strings.TrimSpace(l); l {
		case "serial", "delete":
			loops[l] = true
		case "none":
		default:
			b.Fatalf("BENCH_CEILING_LOOPS: %q is not a loop: use serial, delete, both (comma-separated) or none", l)
		}
	}
	ctx := context.Background()
	db := testenv.NewDB(b)
	k := testenv.NewKafka(b, 3, topic)
	// As `migrate up` does for a table of several shards.
	if _, err := outbox.CreateShardIndex(ctx, db.Pool, db.Table, shards); err != nil {
		b.Fatal(err)
	}
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = mode
	cfg.BatchSize = batch
	cfg.Shards = shards
	cfg.RelayName, cfg.CheckpointTopic = "bench-relay", "bench-checkpoints" // one relay identity per table
	cfg.PollInterval = time.Second
	load := func() {
		b.Helper()
		if err := loadtest.Load(ctx, db.Pool, db.Table, topic, rows, size); err != nil {
			b.Fatal(err)
		}
	}
	drainDB := func(on outbox.OnPublish) float64 {
		b.Helper()
		load()
		d, n, err := loadtest.DrainCeiling(ctx, db.Pool, db.Table, batch, shards, on)
		if err != nil {
			b.Fatal(err)
		}
		if n != rows {
			b.Fatalf("the %s ceiling drained %d of %d rows", on, n, rows)
		}
		return float64(n) / d.Seconds()
	}
	drainRelay := func(on outbox.OnPublish, opts ...relay.Option) loadtest.Drain {
		b.Helper()
		load()
		cfg := cfg
		cfg.OnPublish = string(on)
		if k.Cluster != nil {
			// A fresh kfake cluster for every drain, closed after it: kfake
			// keeps every record in this process's memory, and the records
			// of earlier drains (40 MB each) would grow the heap the
			// relay's garbage collector works through, a cost no relay
			// has next to a real broker.
			fresh := testenv.NewKafka(b, 3, topic)
			defer fresh.Cluster.Close()
			cfg.KafkaBrokers = fresh.Brokers
		}
		d, err := loadtest.DrainRelay(ctx, db.Pool, cfg, rows, 0, opts...)
		if err != nil {
			b.Fatal(err)
		}
		return d
	}
	var dbRates, relayRates, steadyRates, serialRates, deleteRates, relayDeleteRates []float64
	for range rounds {
		for range b.N {
			dbRates = append(dbRates, drainDB(outbox.Mark))
			d := drainRelay(outbox.Mark)
			relayRates, steadyRates = append(relayRates, d.Rate()), append(steadyRates, d.SteadyRate())
			// The same relay with the pipeline off: what the pipeline buys,
			// on the same rows in the same run.
			if loops["serial"] {
				serialRates = append(serialRates, drainRelay(outbox.Mark, relay.WithSerialLoop()).Rate())
			}
			if loops["delete"] {
				// OUTBOX_ON_PUBLISH=delete, against its own ceiling.
				deleteRates = append(deleteRates, drainDB(outbox.Delete))
				relayDeleteRates = append(relayDeleteRates, drainRelay(outbox.Delete).Rate())
			}
		}
	}
	db1, r1 := median(dbRates), median(relayRates)
	b.ReportMetric(float64(rows), "rows")
	b.ReportMetric(db1, "ceiling-rows/s")
	b.ReportMetric(r1, "relay-rows/s")
	b.ReportMetric(r1/db1, "ratio")
	// The relay's rate after its start (ownership, recovery, the first
	// batch: about 0.1 s), against the same ceiling: what a long drain
	// approaches.
	b.ReportMetric(median(steadyRates)/db1, "steady-ratio")
	if loops["serial"] {
		s1 := median(serialRates)
		b.ReportMetric(s1, "serial-rows/s")
		b.ReportMetric(s1/db1, "serial-ratio")
	}
	if loops["delete"] {
		d1, rd1 := median(deleteRates), median(relayDeleteRates)
		b.ReportMetric(d1, "ceiling-delete-rows/s")
		b.ReportMetric(rd1, "relay-delete-rows/s")
		b.ReportMetric(rd1/d1, "delete-ratio")
	}
}
