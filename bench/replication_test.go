package bench

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/replication"
)

// logicalDB starts a private PostgreSQL at wal_level=logical (the same
// settings for both of the benchmark's clusters) and migrates the outbox.
// synchronous_commit=off makes loading single-row transactions quick; it
// does not change what is decoded or published.
func logicalDB(b *testing.B) *testenv.DB {
	b.Helper()
	pg := testenv.StartPrivatePostgres(b, "wal_level=logical", "max_replication_slots=8", "max_wal_senders=8", "synchronous_commit=off", "max_wal_size=4GB")
	url := pg.URL("postgres", "postgres")
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(pool.Close)
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		b.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		b.Fatal(err)
	}
	return &testenv.DB{URL: url, Pool: pool, Table: outbox.DefaultTable}
}

// loadTxns commits rows rows of 200-byte values in transactions of perTxn
// rows: COPY (outbox.Table.WriteMany) for many rows, single-row INSERTs
// from 8 connections for perTxn 1.
func loadTxns(b *testing.B, db *testenv.DB, rows, perTxn int) {
	b.Helper()
	ctx := context.Background()
	v := loadtest.Value("", 200)
	msg := func(i int) outbox.Message {
		return outbox.Message{Topic: topic, Key: []byte("acct-" + strconv.Itoa(i%1000)), Value: v}
	}
	// The walsender decodes only flushed WAL: one synchronous commit
	// at the end flushes the asynchronous ones before it. The CHECKPOINT
	// logs the running transactions, so that once the slots are confirmed
	// past it their restart_lsn moves up and the next round's decoding
	// does not begin inside this round's WAL.
	defer func() {
		if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			_, err := tx.Exec(ctx, `SET LOCAL synchronous_commit = on; CREATE TABLE IF NOT EXISTS bench_flush (x int); INSERT INTO bench_flush VALUES (1)`)
			return err
		}); err != nil {
			b.Fatal(err)
		}
		if _, err := db.Pool.Exec(ctx, `CHECKPOINT`); err != nil {
			b.Fatal(err)
		}
	}()
	if perTxn > 1 {
		for done := 0; done < rows; done += perTxn {
			msgs := make([]outbox.Message, min(perTxn, rows-done))
			for i := range msgs {
				msgs[i] = msg(done + i)
			}
			if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
				b.Fatal(err)
			}
		}
		return
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := w; i < rows; i += 8 {
				if err := db.Table.Write(ctx, db.Pool, msg(i)); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	if err := <-errs; err != nil {
		b.Fatal(err)
	}
}

// decodeCeiling reads rows outbox rows from the slot with package
// replication (pglogrepl and the relay's pgoutput decoder, no Kafka),
// confirming each transaction, and returns the rate.
func decodeCeiling(b *testing.B, rcfg replication.Config, rows int) float64 {
	b.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	s, err := replication.Open(ctx, rcfg, replication.Position{})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close(context.Background()) //nolint:errcheck
	n := 0
	for n < rows {
		ev, err := s.Next(ctx)
		if err != nil {
			b.Fatalf("decode ceiling after %d of %d rows: %v", n, rows, err)
		}
		if ev.Txn != nil {
			n += len(ev.Txn.Rows)
			s.Confirm(ev.Txn.EndLSN)
		}
	}
	d := time.Since(start)
	if n != rows {
		b.Fatalf("the decode ceiling read %d rows, want %d", n, rows)
	}
	return float64(rows) / d.Seconds()
}

// BenchmarkReplicationSource compares, on the same rows and in turns
// (BENCH_REPL_ROUNDS rounds, default 3): the decode-only ceiling (a slot of
// its own read with package replication, no Kafka), the relay in
// OUTBOX_SOURCE=replication (its own slot, the same WAL), and the relay in
// OUTBOX_SOURCE=poll on a second private cluster of the same settings
// loaded with the same transactions. Rows: BENCH_REPL_ROWS (default
// 100000) of 200 bytes in 1,000-row transactions; BENCH_REPL_SINGLE_ROWS
// (default 20000) in single-row transactions. Each drain is timed from the
// start (the relay's start-up included; steady-* from its first committed
// batch). OUTBOX_BATCH_SIZE is 1000 in both modes. It reports the median
// rates, and the medians of the ratios relay/ceiling and replication/poll
// taken within each round.
//
//	go test -run '^$' -bench ReplicationSource -benchtime 1x -timeout 60m ./bench/
func BenchmarkReplicationSource(b *testing.B) {
	rounds := envInt(b, "BENCH_REPL_ROUNDS", 3)
	for _, shape := range []struct {
		name   string
		perTxn int
		rows   int
	}{
		{"txn=1000", 1000, envInt(b, "BENCH_REPL_ROWS", 100000)},
		{"txn=1", 1, envInt(b, "BENCH_REPL_SINGLE_ROWS", 20000)},
	} {
		b.Run(shape.name, func(b *testing.B) {
			replSource(b, shape.perTxn, shape.rows, rounds)
		})
	}
}

func replSource(b *testing.B, perTxn, rows, rounds int) {
	b.StopTimer()
	ctx := context.Background()
	repl, poll := logicalDB(b), logicalDB(b)
	k := testenv.NewKafka(b, 3, topic)
	cfgFor := func(db *testenv.DB, source string) relay.Config {
		cfg := testenv.RelayConfig(db, k)
		cfg.BatchSize = 1000
		cfg.PollInterval = time.Second
		cfg.LogLevel = "warn"
		cfg.RelayName, cfg.CheckpointTopic = "bench-relay", "bench-checkpoints-"+source
		if source == "replication" {
			cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
		}
		return cfg
	}
	fresh := func(cfg relay.Config) (relay.Config, func()) {
		if k.Cluster == nil {
			return cfg, func() {}
		}
		// A fresh kfake cluster per drain, as BenchmarkCeiling does.
		f := testenv.NewKafka(b, 3, topic)
		cfg.KafkaBrokers = f.Brokers
		return cfg, f.Cluster.Close
	}
	replCfg, pollCfg := cfgFor(repl, "replication"), cfgFor(poll, "poll")
	// The relay's first start creates the publication and its slot (the
	// hand-over finds an empty table); the ceiling's slot is made next, so
	// that both slots read the same WAL from here on.
	first := testenv.StartRelay(b, repl, replCfg)
	for deadline := time.Now().Add(time.Minute); ; {
		var active bool
		err := repl.Pool.QueryRow(ctx, `SELECT coalesce(bool_or(active), false) FROM pg_replication_slots`).Scan(&active)
		if err != nil {
			b.Fatal(err)
		}
		if active {
			break
		}
		if time.Now().After(deadline) {
			b.Fatal("the relay's replication stream did not start within a minute")
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := first.Stop(); err != nil {
		b.Fatal(err)
	}
	if _, err := repl.Pool.Exec(ctx, `SELECT pg_create_logical_replication_slot('bench_ceiling', 'pgoutput')`); err != nil {
		b.Fatal(err)
	}
	rcfg := replication.Config{ConnString: repl.URL, Slot: "bench_ceiling", Publication: replication.DefaultPublication("public", "outbox"),
		Table: replication.Table{Schema: "public", Name: "outbox"}}
	var ceilRates, replRates, replSteady, pollRates, pollSteady []float64
	total := 0
	for range rounds {
		for range b.N {
			loadTxns(b, repl, rows, perTxn)
			total += rows
			ceilRates = append(ceilRates, decodeCeiling(b, rcfg, rows))
			cfg, done := fresh(replCfg)
			d, err := loadtest.DrainRelay(ctx, repl.Pool, cfg, rows, 0)
			done()
			if err != nil {
				b.Fatal(err)
			}
			replRates, replSteady = append(replRates, d.Rate()), append(replSteady, d.SteadyRate())

			loadTxns(b, poll, rows, perTxn)
			cfg, done = fresh(pollCfg)
			d, err = loadtest.DrainRelay(ctx, poll.Pool, cfg, rows, 0)
			done()
			if err != nil {
				b.Fatal(err)
			}
			pollRates, pollSteady = append(pollRates, d.Rate()), append(pollSteady, d.SteadyRate())
		}
	}
	var unpub int
	if err := poll.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE published_at IS NULL`).Scan(&unpub); err != nil {
		b.Fatal(err)
	}
	if unpub != 0 {
		b.Fatalf("the poll relay left %d rows unpublished", unpub)
	}
	// Ratios are paired within a round (the same minutes of a shared
	// machine), then their median taken.
	paired := func(num, den []float64) float64 {
		v := make([]float64, len(num))
		for i := range num {
			v[i] = num[i] / den[i]
		}
		return median(v)
	}
	b.ReportMetric(float64(rows), "rows")
	b.ReportMetric(median(ceilRates), "ceiling-rows/s")
	b.ReportMetric(median(replRates), "repl-rows/s")
	b.ReportMetric(median(pollRates), "poll-rows/s")
	b.ReportMetric(paired(replRates, ceilRates), "repl/ceiling")
	b.ReportMetric(paired(replSteady, ceilRates), "steady-repl/ceiling")
	b.ReportMetric(paired(replRates, pollRates), "repl/poll")
	b.ReportMetric(paired(replSteady, pollSteady), "steady-repl/poll")
	b.Logf("rounds: ceiling %s, replication %s (steady %s), poll %s (steady %s) rows/s", rates(ceilRates), rates(replRates), rates(replSteady), rates(pollRates), rates(pollSteady))
}

func rates(v []float64) string {
	s := ""
	for i, x := range v {
		if i > 0 {
			s += " "
		}
		s += fmt.Sprintf("%.0f", x)
	}
	return s
}
