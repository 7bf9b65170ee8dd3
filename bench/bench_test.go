package bench

import (
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

const topic = "bench-payments"

// value is a typical payment event: 104 bytes of JSON.
var value = []byte(`{"type":"transfer","amount":"100.00","currency":"EUR","from":"acct-1","to":"acct-2","ref":"0123456789ab"}`)

// messages returns n messages of topic, keys cycling over 1000 accounts.
func messages(n int) []outbox.Message {
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: topic, Key: []byte("acct-" + strconv.Itoa(i%1000)), Value: value}
	}
	return msgs
}

// insert writes n rows with COPY (outbox.Table.WriteMany), in transactions of
// at most 10000 rows, and returns their ids.
func insert(b *testing.B, db *testenv.DB, n int) []int64 {
	b.Helper()
	ctx := context.Background()
	for done := 0; done < n; {
		k := min(n-done, 10000)
		err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
			return db.Table.WriteMany(ctx, tx, messages(k))
		})
		if err != nil {
			b.Fatal(err)
		}
		done += k
	}
	rows, err := db.Pool.Query(ctx, `SELECT id FROM outbox ORDER BY id`)
	if err != nil {
		b.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		b.Fatal(err)
	}
	return ids
}

// published sums outbox_relay_published_records_total: rows published in a
// committed Kafka transaction and then marked in Postgres (the relay counts
// them after the mark).
func published(b *testing.B, reg *prometheus.Registry) int {
	b.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		b.Fatal(err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "outbox_relay_published_records_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			n += m.GetCounter().GetValue()
		}
	}
	return int(n)
}

// BenchmarkRelayThroughput: b.N rows are in the outbox before the relay
// starts; the clock runs from StartRelay until every row is published and
// marked. One shard, one relay, 3 partitions, 1000 keys, 104-byte values.
//
// rows/s includes the relay's start (schema check, checkpoint topic,
// ownership, InitProducerID, checkpoint read), which start-ms reports alone;
// steady-rows/s is the rate from the first committed batch to the last.
// After the clock stops, a read_committed consumer checks that every row
// arrived exactly once.
//
//	go test -run '^$' -bench RelayThroughput -benchtime 50000x ./bench/
func BenchmarkRelayThroughput(b *testing.B) {
	for _, batch := range []int{100, 500} {
		b.Run("batch="+strconv.Itoa(batch), func(b *testing.B) {
			b.StopTimer()
			db := testenv.NewDB(b)
			k := testenv.NewKafka(b, 3, topic)
			ids := insert(b, db, b.N)
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = batch
			cfg.PollInterval = time.Second
			reg := prometheus.NewRegistry()

			b.ResetTimer()
			b.StartTimer()
			start := time.Now()
			testenv.StartRelay(b, db, cfg, relay.WithRegisterer(reg))
			var first time.Time
			firstN := 0
			deadline := start.Add(10*time.Minute + time.Duration(b.N)*time.Millisecond)
			for {
				n := published(b, reg)
				if n > 0 && first.IsZero() {
					first, firstN = time.Now(), n
				}
				if n >= b.N {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d rows published after %v", n, b.N, time.Since(start))
				}
				time.Sleep(2 * time.Millisecond)
			}
			end := time.Now()
			b.StopTimer()

			b.ReportMetric(float64(b.N)/end.Sub(start).Seconds(), "rows/s")
			b.ReportMetric(float64(first.Sub(start).Microseconds())/1000, "start-ms")
			if b.N > firstN && end.After(first) {
				b.ReportMetric(float64(b.N-firstN)/end.Sub(first).Seconds(), "steady-rows/s")
			}
			if left := db.Unpublished(b); left != 0 {
				b.Fatalf("%d rows still unpublished after the counter reached %d", left, b.N)
			}
			seen := k.NewConsumer(b, topic).WaitFor(b, len(ids), 2*time.Minute)
			testenv.CheckExactlyOnce(b, ids, seen)
		})
	}
}

// BenchmarkWakeLatency: an idle relay (its worker waiting for a notification
// or its next poll), one row committed by a writer; the clock runs from the
// writer's COMMIT until a query on another connection sees the row marked
// published (polled every 200µs). Between rows the benchmark waits 20 to
// 120 ms, off the clock, so that the relay is idle again and has released
// its wake-up lock. OUTBOX_POLL_INTERVAL is the production default, 1s.
//
//	go test -run '^$' -bench WakeLatency -benchtime 300x ./bench/
func BenchmarkWakeLatency(b *testing.B) {
	b.StopTimer()
	ctx := context.Background()
	db := testenv.NewDB(b)
	k := testenv.NewKafka(b, 3, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.PollInterval = time.Second
	testenv.StartRelay(b, db, cfg)

	poll, err := db.Pool.Acquire(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer poll.Release()
	marked := func(id int64, timeout time.Duration) time.Duration {
		t0 := time.Now()
		for {
			var done bool
			if err := poll.QueryRow(ctx, `SELECT published_at IS NOT NULL FROM outbox WHERE id = $1`, id).Scan(&done); err != nil {
				b.Fatal(err)
			}
			if done {
				return time.Since(t0)
			}
			if time.Since(t0) > timeout {
				b.Fatalf("row %d not published after %v", id, timeout)
			}
			time.Sleep(200 * time.Microsecond)
		}
	}
	write := func() (int64, pgx.Tx) {
		tx, err := db.Pool.Begin(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if err := db.Table.Write(ctx, tx, outbox.Message{Topic: topic, Key: []byte("acct-1"), Value: value}); err != nil {
			b.Fatal(err)
		}
		var id int64
		if err := tx.QueryRow(ctx, `SELECT lastval()`).Scan(&id); err != nil {
			b.Fatal(err)
		}
		return id, tx
	}

	// Warm up: the first row waits for the relay's start and recovery.
	id, tx := write()
	if err := tx.Commit(ctx); err != nil {
		b.Fatal(err)
	}
	marked(id, time.Minute)

	rng := rand.New(rand.NewPCG(1, 2))
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for range b.N {
		time.Sleep(20*time.Millisecond + time.Duration(rng.Int64N(int64(100*time.Millisecond))))
		id, tx := write()
		b.StartTimer()
		t0 := time.Now()
		if err := tx.Commit(ctx); err != nil {
			b.Fatal(err)
		}
		marked(id, 30*time.Second)
		lat = append(lat, time.Since(t0))
		b.StopTimer()
	}

	slices.Sort(lat)
	ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
	q := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
	b.ReportMetric(ms(q(0.50)), "p50-ms")
	b.ReportMetric(ms(q(0.99)), "p99-ms")
	b.ReportMetric(ms(lat[len(lat)-1]), "max-ms")
}

// BenchmarkWriteOutbox: what writing the outbox costs an application, one
// writer, one transaction per op (BEGIN, write, COMMIT with
// synchronous_commit on): Write of one row, and 100 or 1000 rows by
// WriteMany (COPY) and by Write (one multi-row INSERT). No relay runs, so each commit also NOTIFYs; with
// one writer that costs little (bench/wakeup-writers.sh measures many).
//
//	go test -run '^$' -bench WriteOutbox -benchtime 2s ./bench/
func BenchmarkWriteOutbox(b *testing.B) {
	ctx := context.Background()
	db := testenv.NewDB(b)
	for _, c := range []struct {
		name  string
		rows  int
		write func(tx pgx.Tx, msgs []outbox.Message) error
	}{
		{"Write/rows=1", 1, func(tx pgx.Tx, msgs []outbox.Message) error { return db.Table.Write(ctx, tx, msgs...) }},
		{"WriteMany-COPY/rows=100", 100, func(tx pgx.Tx, msgs []outbox.Message) error { return db.Table.WriteMany(ctx, tx, msgs) }},
		{"Write-INSERT/rows=100", 100, func(tx pgx.Tx, msgs []outbox.Message) error { return db.Table.Write(ctx, tx, msgs...) }},
		{"WriteMany-COPY/rows=1000", 1000, func(tx pgx.Tx, msgs []outbox.Message) error { return db.Table.WriteMany(ctx, tx, msgs) }},
		{"Write-INSERT/rows=1000", 1000, func(tx pgx.Tx, msgs []outbox.Message) error { return db.Table.Write(ctx, tx, msgs...) }},
	} {
		b.Run(c.name, func(b *testing.B) {
			if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
				b.Fatal(err)
			}
			msgs := messages(c.rows)
			for b.Loop() {
				if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return c.write(tx, msgs) }); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric(float64(c.rows*b.N)/b.Elapsed().Seconds(), "rows/s")
		})
	}
}

// BenchmarkWritersWithRelay: what the wake-up costs the writers with the
// real relay running (kfake behind it), not a simulation of it. pgbench runs
// 16 clients of single-row INSERTs for BENCH_WRITERS_SECONDS (default 10)
// while a relay publishes what they write, with the wake-up trigger dropped
// ("none") and with it ("gated"), alternating for BENCH_WRITERS_ROUNDS
// rounds (default 3), each run on a fresh database and relay.
//
// It reports the median writer TPS of both, loss-% (the median over rounds
// of the gated run's loss against the trigger-less run of the same round),
// and lock-held-%: the share of 5 ms samples, during the gated runs, in
// which the relay held its wake-up lock, i.e. in which writers skipped the
// NOTIFY (the samples include pgbench's connection set-up, a second or so
// in which the relay is idle).
//
// On a shared machine the run-to-run noise of loss-% is large. So each
// round also runs the trigger in the same pgbench run as its absence: two
// scripts at weight 1:1, one inserting into the outbox (trigger, relay) and
// one into an identical table without trigger, both on the same machine at
// the same moment. trigger-cost-% is the median of how much longer the
// outbox script's mean transaction took; the round's log line tells whether
// the relay held its lock meanwhile.
//
// Needs pgbench on PATH.
//
//	go test -run '^$' -bench WritersWithRelay -benchtime 1x ./bench/
func BenchmarkWritersWithRelay(b *testing.B) {
	pgbench, err := exec.LookPath("pgbench")
	if err != nil {
		b.Fatalf("pgbench is not installed: %v", err)
	}
	seconds := envInt(b, "BENCH_WRITERS_SECONDS", 10)
	rounds := envInt(b, "BENCH_WRITERS_ROUNDS", 3)
	dir := b.TempDir()
	script := func(table string) string {
		f := filepath.Join(dir, table+".sql")
		sql := `\set aid random(1, 100000)` + "\n" +
			`INSERT INTO ` + table + ` (topic, key, value) VALUES ('` + topic +
			`', convert_to('acct-' || :aid, 'UTF8'), '{"amount":100,"currency":"EUR"}');` + "\n"
		if err := os.WriteFile(f, []byte(sql), 0o644); err != nil {
			b.Fatal(err)
		}
		return f
	}
	outboxSQL, plainSQL := script("outbox"), script("outbox_plain")

	// one runs pgbench against a fresh database with a relay publishing;
	// it returns the writers' TPS, the share of time the relay held its
	// wake-up lock, and pgbench's output.
	one := func(mode string) (tps, heldPct float64, out []byte) {
		ctx := context.Background()
		db := testenv.NewDB(b)
		args := []string{"-f", outboxSQL}
		switch mode {
		case "none":
			if _, err := db.Pool.Exec(ctx, `DROP TRIGGER outbox_wakeup ON outbox`); err != nil {
				b.Fatal(err)
			}
		case "same":
			if _, err := db.Pool.Exec(ctx, `CREATE TABLE outbox_plain (LIKE outbox INCLUDING ALL)`); err != nil {
				b.Fatal(err)
			}
			args = []string{"-f", plainSQL + "@1", "-f", outboxSQL + "@1"}
		}
		k := testenv.NewKafka(b, 3, topic)
		cfg := testenv.RelayConfig(db, k)
		cfg.BatchSize = 500
		cfg.PollInterval = time.Second
		run := testenv.StartRelay(b, db, cfg)
		defer run.Stop() //nolint:errcheck // a clean stop; the next run needs the CPU
		for !run.Relay.Ready() {
			time.Sleep(10 * time.Millisecond)
		}

		sctx, stop := context.WithCancel(ctx)
		var held, samples int
		sampled := make(chan struct{})
		go func() {
			defer close(sampled)
			conn, err := db.Pool.Acquire(sctx)
			if err != nil {
				return
			}
			defer conn.Release()
			for sctx.Err() == nil {
				var n int
				if err := conn.QueryRow(sctx, `SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND mode = 'ExclusiveLock'
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = $1 AND objid::bigint = (hashtext($2)::bigint & 4294967295) AND objsubid = 2`,
					migrations.LockKey, db.Table.String()).Scan(&n); err == nil {
					samples++
					if n > 0 {
						held++
					}
				}
				time.Sleep(5 * time.Millisecond)
			}
		}()
		args = append([]string{"-n", "-M", "prepared", "-c", "16", "-j", "2", "-T", strconv.Itoa(seconds)}, args...)
		out, err := exec.Command(pgbench, append(args, db.URL)...).CombinedOutput()
		stop()
		<-sampled
		if err != nil {
			b.Fatalf("pgbench: %v\n%s", err, out)
		}
		m := regexp.MustCompile(`(?m)^tps = ([0-9.]+) \(without initial connection time\)`).FindSubmatch(out)
		if m == nil {
			b.Fatalf("no tps in pgbench output:\n%s", out)
		}
		tps, _ = strconv.ParseFloat(string(m[1]), 64)
		if samples > 0 {
			heldPct = 100 * float64(held) / float64(samples)
		}
		return tps, heldPct, out
	}
	// The per-script mean latencies of a two-script run, in -f order.
	scriptLatency := regexp.MustCompile(`(?m)^ - latency average = ([0-9.]+) ms$`)

	var none, gated, loss, held, cost []float64
	for range b.N {
		for r := range rounds {
			n, _, _ := one("none")
			g, h, _ := one("gated")
			_, sh, out := one("same")
			lat := scriptLatency.FindAllSubmatch(out, -1)
			if len(lat) != 2 {
				b.Fatalf("expected two per-script latencies in pgbench output:\n%s", out)
			}
			plain, _ := strconv.ParseFloat(string(lat[0][1]), 64)
			trig, _ := strconv.ParseFloat(string(lat[1][1]), 64)
			c := 100 * (trig/plain - 1)
			none, gated, held, cost = append(none, n), append(gated, g), append(held, h), append(cost, c)
			loss = append(loss, 100*(1-g/n))
			b.Logf("round %d: writer TPS without trigger %.0f, with trigger %.0f (loss %.1f%%, lock held %.1f%% of the time); "+
				"same run: %.3f ms without, %.3f ms with trigger (%+.1f%%, lock held %.1f%%)",
				r+1, n, g, 100*(1-g/n), h, plain, trig, c, sh)
		}
	}
	b.ReportMetric(median(none), "none-tps")
	b.ReportMetric(median(gated), "gated-tps")
	b.ReportMetric(median(loss), "loss-%")
	b.ReportMetric(median(held), "lock-held-%")
	b.ReportMetric(median(cost), "trigger-cost-%")
}

func envInt(b *testing.B, name string, def int) int {
	b.Helper()
	s := os.Getenv(name)
	if s == "" {
		return def
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		b.Fatalf("%s=%q: expected a positive integer", name, s)
	}
	return n
}

func median(v []float64) float64 {
	s := slices.Sorted(slices.Values(v))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
