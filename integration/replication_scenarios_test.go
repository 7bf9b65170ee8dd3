package integration

import (
	"context"
	"math/rand/v2"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/faultproxy"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// replConfig is the in-process relay's configuration in
// OUTBOX_SOURCE=replication.
func replConfig(db *testenv.DB, k *testenv.Kafka) relay.Config {
	cfg := testenv.RelayConfig(db, k)
	cfg.Source, cfg.DeadLetterOrder, cfg.BatchSize = "replication", "skip", 25
	return cfg
}

// walLSN is the server's current WAL position.
func walLSN(t *testing.T, db *testenv.DB) pglogrepl.LSN {
	t.Helper()
	var s string
	if err := db.Pool.QueryRow(context.Background(), `SELECT pg_current_wal_lsn()::text`).Scan(&s); err != nil {
		t.Fatal(err)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return lsn
}

// slotConfirmed is the relay's slot's confirmed_flush_lsn.
func slotConfirmed(t *testing.T, db *testenv.DB) pglogrepl.LSN {
	t.Helper()
	var s string
	// After a crash-restart the pool's idle connections are dead and the
	// server may still be starting: ask again for a while.
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := db.Pool.QueryRow(context.Background(), `SELECT coalesce(confirmed_flush_lsn, '0/0')::text FROM pg_replication_slots WHERE slot_type = 'logical'`).Scan(&s)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("read the slot: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	lsn, err := pglogrepl.ParseLSN(s)
	if err != nil {
		t.Fatal(err)
	}
	return lsn
}

func eventually(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// retryInsert is db.Insert that waits for the server to accept
// connections again (after a crash-restart).
func retryInsert(t *testing.T, db *testenv.DB, topic string, n int, keys []string) []int64 {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		var ids []int64
		err := pgx.BeginFunc(context.Background(), db.Pool, func(tx pgx.Tx) error {
			for range n {
				var id int64
				if err := tx.QueryRow(context.Background(), `INSERT INTO outbox (topic, key, value) VALUES ($1, $2, 'v') RETURNING id`, topic, []byte(keys[rand.IntN(len(keys))])).Scan(&id); err != nil {
					return err
				}
				ids = append(ids, id)
			}
			return nil
		})
		if err == nil {
			return ids
		}
		if time.Now().After(deadline) {
			t.Fatalf("insert: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// TestReplicationPostgresCrashRestartAfterAConfirm: the relay publishes,
// the slot is confirmed past what it published, then PostgreSQL is stopped
// with -m immediate and started again (the slot's confirmed position may go
// back to the last checkpoint's). The relay reconnects by itself and
// publishes every row once: the ones before the crash are not repeated.
func TestReplicationPostgresCrashRestartAfterAConfirm(t *testing.T) {
	pg, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	run := testenv.StartRelay(t, db, replConfig(db, k), relay.WithLogger(testenv.Logger(t, nil)))
	var want []int64
	for range 10 {
		want = append(want, db.Insert(t, topic, 7, keys)...)
	}
	c.WaitFor(t, len(want), 60*time.Second)
	at := walLSN(t, db)
	eventually(t, 30*time.Second, "confirm of the published rows", func() bool { return slotConfirmed(t, db) >= at })
	before := slotConfirmed(t, db)
	for round := range 2 {
		pg.Crash()
		pg.Start()
		after := slotConfirmed(t, db)
		t.Logf("crash-restart %d: the slot's confirmed_flush_lsn was %s, after the restart %s", round+1, before, after)
		for range 10 {
			want = append(want, retryInsert(t, db, topic, 5, keys)...)
		}
		c.WaitFor(t, len(want), 90*time.Second)
		at = walLSN(t, db)
		eventually(t, 60*time.Second, "confirm after the crash-restart", func() bool { return slotConfirmed(t, db) >= at })
		before = slotConfirmed(t, db)
	}
	testenv.CheckExactlyOnce(t, want, c.WaitFor(t, len(want), time.Second))
	if err := run.Stop(); err != nil {
		t.Fatalf("the relay stopped with %v", err)
	}
}

// TestReplicationLongTransactionAcrossRelayRestarts: a transaction opens
// and writes outbox rows, then stays open while other transactions commit
// and are published, while the outbox is idle long enough for an idle
// checkpoint past the long transaction's first change to be committed and
// confirmed, and across a clean restart and a crash of the relay. When it
// commits, its rows are published, once, after those committed before it.
func TestReplicationLongTransactionAcrossRelayRestarts(t *testing.T) {
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	keys := []string{"acct-1", "acct-2"}
	c := k.NewConsumer(t, topic)
	ctx := context.Background()
	cfg := replConfig(db, k)
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want := db.Insert(t, topic, 5, keys)
	c.WaitFor(t, len(want), 60*time.Second)

	long, err := db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer long.Rollback(ctx) //nolint:errcheck
	var longIDs []int64
	for i := range 30 {
		var id int64
		if err := long.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, $2, 'long') RETURNING id`, topic, []byte("long-"+string(rune('a'+i%3)))).Scan(&id); err != nil {
			t.Fatal(err)
		}
		longIDs = append(longIDs, id)
	}
	opened := walLSN(t, db)
	want = append(want, db.Insert(t, topic, 12, keys)...)
	c.WaitFor(t, len(want), 60*time.Second)
	// Idle, with WAL written elsewhere, past the idle checkpoint interval.
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE busy (pad text)`); err != nil {
		t.Fatal(err)
	}
	eventually(t, 40*time.Second, "an idle confirm past the long transaction's first change", func() bool {
		if _, err := db.Pool.Exec(ctx, `INSERT INTO busy SELECT repeat('x', 100) FROM generate_series(1, 100)`); err != nil {
			t.Fatal(err)
		}
		return slotConfirmed(t, db) > opened
	})
	t.Logf("the slot is confirmed to %s, past %s, while the long transaction is open", slotConfirmed(t, db), opened)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	want = append(want, db.Insert(t, topic, 6, keys)...)
	var crashes atomic.Int64
	crash := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name == relay.FailAfterCommit && crashes.Add(1) == 1 {
			return errFailpointCrash
		}
		return nil
	}
	run = testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	if err := run.Wait(t, 60*time.Second); err == nil {
		t.Fatal("the relay did not stop at its failpoint")
	}
	want = append(want, db.Insert(t, topic, 4, keys)...)
	run = testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	c.WaitFor(t, len(want), 60*time.Second)
	if err := long.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	want = append(want, longIDs...)
	want = append(want, db.Insert(t, topic, 3, keys)...)
	seen := c.WaitFor(t, len(want), 60*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	// The long transaction commits after the rows with higher ids: in
	// commit order, its rows come after them on their partitions.
	pos := map[int64]testenv.Seen{}
	for _, s := range seen {
		pos[s.ID] = s
	}
	for _, id := range longIDs {
		if pos[id].Value == nil || string(pos[id].Value) != "long" {
			t.Fatalf("row %d of the long transaction arrived as %q", id, pos[id].Value)
		}
	}
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
}

var errFailpointCrash = errorString("crash after a Kafka commit, before the slot is confirmed")

type errorString string

func (e errorString) Error() string { return string(e) }

// TestReplicationAlterTableMidStream: columns are added to the outbox while
// the relay streams: one with a constant default in the same transaction as
// outbox rows, one with a volatile default (a table rewrite), then the
// relay restarts (its new stream learns the table again). Every row is
// published once with its key and value.
func TestReplicationAlterTableMidStream(t *testing.T) {
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	ctx := context.Background()
	cfg := replConfig(db, k)
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want := db.Insert(t, topic, 10, keys)
	c.WaitFor(t, len(want), 60*time.Second)
	var mid []int64
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		var id int64
		if err := tx.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, 'acct-1', 'before-alter') RETURNING id`, topic).Scan(&id); err != nil {
			return err
		}
		mid = append(mid, id)
		if _, err := tx.Exec(ctx, `ALTER TABLE outbox ADD COLUMN tenant text DEFAULT 'x'`); err != nil {
			return err
		}
		if err := tx.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, tenant) VALUES ($1, 'acct-2', 'after-alter', 'eu') RETURNING id`, topic).Scan(&id); err != nil {
			return err
		}
		mid = append(mid, id)
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	want = append(want, mid...)
	want = append(want, db.Insert(t, topic, 10, keys)...)
	c.WaitFor(t, len(want), 60*time.Second)
	if _, err := db.Pool.Exec(ctx, `ALTER TABLE outbox ADD COLUMN noted_at timestamptz DEFAULT clock_timestamp()`); err != nil {
		t.Fatal(err)
	}
	want = append(want, db.Insert(t, topic, 10, keys)...)
	c.WaitFor(t, len(want), 60*time.Second)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	want = append(want, db.Insert(t, topic, 10, keys)...)
	run = testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want = append(want, db.Insert(t, topic, 10, keys)...)
	seen := c.WaitFor(t, len(want), 60*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	db.CheckPayloads(t, seen)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
}

// TestReplicationKafkaDownLongerThanWalSenderTimeout: Kafka is cut off (a
// proxy that answers nothing) for 5 times wal_sender_timeout (2 s) while
// rows are written. The slot is not confirmed past what Kafka holds while it
// is down; once Kafka is back every row is published once.
func TestReplicationKafkaDownLongerThanWalSenderTimeout(t *testing.T) {
	_, db := logicalCluster(t, "wal_sender_timeout=2s")
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	proxy, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	cfg := replConfig(db, k)
	cfg.KafkaBrokers = proxy.Addrs()
	logs := &testenv.SyncBuffer{}
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)))
	want := db.Insert(t, topic, 10, keys)
	c.WaitFor(t, len(want), 60*time.Second)
	at := walLSN(t, db)
	eventually(t, 30*time.Second, "confirm of the published rows", func() bool { return slotConfirmed(t, db) >= at })

	proxy.Freeze()
	held := walLSN(t, db)
	for range 5 {
		want = append(want, db.Insert(t, topic, 4, keys)...)
		time.Sleep(time.Second)
	}
	for range 10 {
		if got := slotConfirmed(t, db); got > held {
			t.Fatalf("Kafka is down, yet the slot was confirmed to %s, past %s where the unpublished rows begin", got, held)
		}
		time.Sleep(500 * time.Millisecond)
	}
	proxy.Thaw()
	want = append(want, db.Insert(t, topic, 4, keys)...)
	seen := c.WaitFor(t, len(want), 120*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	at = walLSN(t, db)
	eventually(t, 60*time.Second, "confirm once Kafka is back", func() bool { return slotConfirmed(t, db) >= at })
	t.Logf("Kafka down 15 s (wal_sender_timeout 2 s): the slot held at %s; %d rows once; relay lines mentioning the walsender's timeout or a lost stream: %d",
		held, len(want), strings.Count(logs.String(), "replication"))
	if err := run.Stop(); err != nil {
		t.Fatalf("the relay stopped with %v", err)
	}
}

// TestReplicationLostProduceAndCommitAnswers: the broker's answers are lost
// on the way to the relay in OUTBOX_SOURCE=replication: Produce answers
// (kgo retries them, the idempotent producer dedupes) and then every EndTxn
// answer for a while, after the broker applied the commit (the outcome is
// unknown to the relay, which recovers from the checkpoint). Every row
// once, and the slot is confirmed again afterwards.
func TestReplicationLostProduceAndCommitAnswers(t *testing.T) {
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	proxy, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	cfg := replConfig(db, k)
	cfg.KafkaBrokers = proxy.Addrs()
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)),
		relay.WithKafkaOptions(kgo.RequestRetries(2), kgo.RetryTimeout(5*time.Second)))
	want := db.Insert(t, topic, 10, keys)
	c.WaitFor(t, len(want), 60*time.Second)

	proxy.DropResponses(kmsg.Produce.Int16(), 3, nil)
	for range 5 {
		want = append(want, db.Insert(t, topic, 6, keys)...)
	}
	c.WaitFor(t, len(want), 60*time.Second)
	produceDrops := proxy.Fired(kmsg.Produce.Int16())

	proxy.DropResponses(kmsg.EndTxn.Int16(), 1000, nil)
	want = append(want, db.Insert(t, topic, 9, keys)...)
	eventually(t, 60*time.Second, "lost EndTxn answers", func() bool { return proxy.Fired(kmsg.EndTxn.Int16()) >= 3 })
	for range 3 {
		want = append(want, db.Insert(t, topic, 5, keys)...)
	}
	time.Sleep(2 * time.Second)
	proxy.ClearFaults()
	endTxnDrops := proxy.Fired(kmsg.EndTxn.Int16())
	want = append(want, db.Insert(t, topic, 5, keys)...)
	seen := c.WaitFor(t, len(want), 120*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	at := walLSN(t, db)
	eventually(t, 60*time.Second, "confirm after the lost answers", func() bool { return slotConfirmed(t, db) >= at })
	t.Logf("Produce answers dropped: %d, EndTxn answers dropped: %d; %d rows once", produceDrops, endTxnDrops, len(want))
	if produceDrops == 0 || endTxnDrops == 0 {
		t.Fatalf("the faults did not fire: %d Produce, %d EndTxn answers dropped", produceDrops, endTxnDrops)
	}
	if err := run.Stop(); err != nil {
		t.Fatalf("the relay stopped with %v", err)
	}
}

// TestReplicationHandOverRepeatedAfterRetention: the first start's
// hand-over creates the slot, and the poll read publishes and marks rows,
// among them rows committed after the slot was created (so they are in the
// stream too); the relay dies before any checkpoint of the replication
// source. Retention then deletes the marked rows (as OUTBOX_RETENTION does,
// or an operator's delete of published rows). The next start hands over
// again from the same slot: the rows the poll read published must not be
// published again because their marks are gone.
func TestReplicationHandOverRepeatedAfterRetention(t *testing.T) {
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	ctx := context.Background()
	cfg := replConfig(db, k)
	want := db.Insert(t, topic, 10, keys) // before the slot exists
	var marks atomic.Int64
	var during []int64
	fail := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name != relay.FailAfterMark {
			return nil
		}
		switch marks.Add(1) {
		case 1:
			// The slot exists: rows committed now are in the stream, and
			// the hand-over's poll read publishes and marks them too.
			during = db.Insert(t, topic, 8, keys)
		case 2:
			return errFailpointCrash
		}
		return nil
	}
	cfg.BatchSize = 10
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(fail))
	if err := run.Wait(t, 60*time.Second); err == nil {
		t.Fatal("the relay did not stop at its failpoint")
	}
	want = append(want, during...)
	c.WaitFor(t, len(want), 60*time.Second)
	// What retention does to published rows.
	tag, err := db.Pool.Exec(ctx, `DELETE FROM outbox WHERE published_at IS NOT NULL`)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("the hand-over's poll read published %d rows (%d committed after the slot was created); retention deleted %d", len(want), len(during), tag.RowsAffected())
	run = testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want = append(want, db.Insert(t, topic, 5, keys)...)
	seen := c.WaitFor(t, len(want), 60*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
}
