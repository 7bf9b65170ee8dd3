package integration

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestRowsOfAnAsyncCommitWriterArePublishedOnlyOnceDurable (found by the
// adversarial tester). The APPLICATION's role
// (not the relay's) has synchronous_commit=off, so PostgreSQL acknowledges
// its outbox rows before their WAL is flushed. The relay reads them (a
// commit is visible before it is durable), commits them to Kafka, and only
// its mark (a local flush) would make them durable. A crash of PostgreSQL in
// between (held open here with a row lock on the rows, as the kill tests
// do, plus a held EndTxn so the lock is taken in time) loses the rows and
// the business change, while Kafka holds committed records for them: events
// of transactions that, after the crash, never happened (verify: phantom).
// The relay must publish only rows whose commit is durable: before
// producing, it makes every commit it read durable (Store.ReadDurable).
func TestRowsOfAnAsyncCommitWriterArePublishedOnlyOnceDurable(t *testing.T) {
	ctx := context.Background()
	pg, admin, appPool := asyncServer(t, "app")

	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	db := &testenv.DB{URL: pg.URL("postgres", "postgres"), Pool: admin, Table: outbox.DefaultTable}
	cfg := testenv.RelayConfig(db, k)
	cfg.RebalanceInterval = 5 * time.Second // lease renewals (durable commits) rarely
	cfg.OwnerLease = 30 * time.Second
	cfg.PollInterval = 100 * time.Millisecond
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	db.Insert(t, topic, 1, nil) // flushed: the relay is up and idle once it is published
	faultsEventually(t, 30*time.Second, "the first row is published", func() bool { return db.Unpublished(t) == 0 })

	arrived, release := make(chan struct{}), make(chan struct{})
	k.Cluster.ControlKey(kmsg.EndTxn.Int16(), func(kmsg.Request) (kmsg.Response, error, bool) {
		close(arrived)
		k.Cluster.SleepControl(func() { <-release })
		return nil, nil, false
	})
	app := &testenv.DB{URL: pg.URL("app", "postgres"), Pool: appPool, Table: outbox.DefaultTable}
	ids := app.Insert(t, topic, 10, nil) // acknowledged, not flushed
	select {
	case <-arrived:
	case <-time.After(20 * time.Second):
		t.Fatal("no EndTxn")
	}
	tx, err := admin.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // its session dies in the crash; this returns it to the pool
	if _, err := tx.Exec(ctx, `SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE`); err != nil {
		t.Fatal(err)
	}
	close(release)
	faultsEventually(t, 20*time.Second, "the mark waits for the row lock", func() bool {
		var n int
		_ = admin.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%published_at = now()%'`).Scan(&n)
		return n > 0
	})
	pg.Crash()
	pg.Start()

	var left int
	faultsEventually(t, 30*time.Second, "the server is back", func() bool {
		return admin.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE id = ANY($1)`, ids).Scan(&left) == nil
	})
	seen := k.NewConsumer(t, topic).WaitFor(t, 11, 15*time.Second)
	inKafka := 0
	want := map[int64]bool{}
	for _, id := range ids {
		want[id] = true
	}
	for _, s := range seen {
		if want[s.ID] {
			inKafka++
		}
	}
	t.Logf("after the crash the table holds %d of the %d acknowledged rows; Kafka holds committed records for %d of them", left, len(ids), inKafka)
	if inKafka > left {
		t.Fatalf("Kafka holds %d committed events of rows PostgreSQL lost in the crash (the table holds %d of %d): phantom events of transactions that never happened",
			inKafka-left, left, len(ids))
	}
	// The rows survived, committed in Kafka: recovery marks them, and
	// nothing is published twice.
	faultsEventually(t, 30*time.Second, "every row is marked after the crash", func() bool {
		var n int
		return admin.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE published_at IS NULL`).Scan(&n) == nil && n == 0
	})
	testenv.CheckExactlyOnce(t, append([]int64{ids[0] - 1}, ids...), k.NewConsumer(t, topic).WaitFor(t, len(ids)+1, 15*time.Second))
}
