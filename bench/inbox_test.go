package bench

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// BenchmarkInboxThroughput: b.N events (104-byte values, 1000 keys, 6
// partitions, each with an outbox-id header) are committed to Kafka before
// one inbox starts; the clock runs from Run until every event is applied.
// The handler does one UPDATE of the event's account row (accounts map to
// partitions by key, so concurrent partitions never wait for each other's
// row locks). Each transaction: lock the offsets row, insert the applied
// rows, the handlers' UPDATEs, move the offset, commit.
//
// events/s includes the group join and the first assignment (start-ms);
// afterwards the test checks that each event was applied exactly once.
//
//	go test -run '^$' -bench InboxThroughput -benchtime 50000x ./bench/
func BenchmarkInboxThroughput(b *testing.B) {
	for _, c := range []struct{ batch, concurrency int }{{100, 1}, {100, 4}, {500, 4}} {
		b.Run("batch="+strconv.Itoa(c.batch)+"/concurrency="+strconv.Itoa(c.concurrency), func(b *testing.B) {
			b.StopTimer()
			ctx := context.Background()
			pool, err := pgxpool.New(ctx, testenv.CreateDatabase(b))
			if err != nil {
				b.Fatal(err)
			}
			defer pool.Close()
			m, err := inbox.NewMigrator(pool, "public", "inbox")
			if err != nil {
				b.Fatal(err)
			}
			if _, err := m.Up(ctx); err != nil {
				b.Fatal(err)
			}
			if _, err := pool.Exec(ctx, `CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL, entries bigint NOT NULL DEFAULT 0);
INSERT INTO accounts (id, balance) SELECT g, 0 FROM generate_series(0, 999) g`); err != nil {
				b.Fatal(err)
			}
			topic := testenv.RandomName("bench-inbox-")
			k := testenv.NewKafka(b, 6, topic)
			produceEvents(b, k, topic, b.N)

			handler := func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
				_, err := tx.Exec(ctx, `UPDATE accounts SET balance = balance + 100, entries = entries + 1 WHERE id = $1`, ev.OutboxID%1000)
				return err
			}
			in, err := inbox.New(inbox.Config{
				Brokers: k.Brokers, Group: testenv.RandomName("bench-"), Topics: []string{topic},
				BatchSize: c.batch, Concurrency: c.concurrency,
			}, pool, handler)
			if err != nil {
				b.Fatal(err)
			}
			runCtx, cancel := context.WithCancel(ctx)
			done := make(chan error, 1)

			b.ResetTimer()
			b.StartTimer()
			start := time.Now()
			go func() { done <- in.Run(runCtx) }()
			var first time.Time
			deadline := start.Add(5*time.Minute + time.Duration(b.N)*time.Millisecond)
			for {
				n := in.Stats().Applied
				if n > 0 && first.IsZero() {
					first = time.Now()
				}
				if n >= int64(b.N) {
					break
				}
				if time.Now().After(deadline) {
					b.Fatalf("%d of %d events applied after %v", n, b.N, time.Since(start))
				}
				time.Sleep(2 * time.Millisecond)
			}
			end := time.Now()
			b.StopTimer()
			cancel()
			if err := <-done; err != nil {
				b.Fatal(err)
			}
			b.ReportMetric(float64(b.N)/end.Sub(start).Seconds(), "events/s")
			b.ReportMetric(float64(first.Sub(start).Microseconds())/1000, "start-ms")

			var applied, entries int64
			if err := pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM inbox_applied), (SELECT sum(entries) FROM accounts)`).Scan(&applied, &entries); err != nil {
				b.Fatal(err)
			}
			if applied != int64(b.N) || entries != int64(b.N) {
				b.Fatalf("%d events produced, %d recorded as applied, %d account entries: not exactly once", b.N, applied, entries)
			}
		})
	}
}

// produceEvents commits n events to topic, keys "acct-<id mod 1000>" with
// Kafka's default partitioner, outbox-ids 1..n, each with a random event id
// as the relay sends it, in transactions of 1000.
func produceEvents(b *testing.B, k *testenv.Kafka, topic string, n int) {
	b.Helper()
	ctx := context.Background()
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic), kgo.TransactionalID(testenv.RandomName("bench-producer-")))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	for lo := 1; lo <= n; lo += 1000 {
		if err := cl.BeginTransaction(); err != nil {
			b.Fatal(err)
		}
		for id := lo; id <= min(n, lo+999); id++ {
			cl.Produce(ctx, &kgo.Record{Key: []byte("acct-" + strconv.Itoa(id%1000)), Value: value,
				Headers: []kgo.RecordHeader{{Key: inbox.HeaderOutboxID, Value: []byte(strconv.Itoa(id))},
					{Key: inbox.HeaderEventID, Value: []byte(outbox.NewEventID())}}}, nil)
		}
		if err := cl.Flush(ctx); err != nil {
			b.Fatal(err)
		}
		if err := cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
			b.Fatal(err)
		}
	}
}
