package integration

import (
	"context"
	"errors"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// logicalDB is a private PostgreSQL at wal_level=logical with a migrated
// outbox table.
func logicalDB(t *testing.T) *testenv.DB {
	t.Helper()
	pg := testenv.StartPrivatePostgres(t, "wal_level=logical", "max_replication_slots=8", "max_wal_senders=8")
	return migratedDB(t, pg.URL("postgres", "postgres"))
}

// migratedDB is the database at url with a migrated outbox table.
func migratedDB(t *testing.T, url string) *testenv.DB {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	return &testenv.DB{URL: url, Pool: pool, Table: outbox.DefaultTable}
}

// TestReplicationSourceExactlyOnceAcrossHandOverAndCrashes: rows committed
// before the first start in OUTBOX_SOURCE=replication (published by the
// hand-over from the poll read), rows written while it runs, in
// transactions of 1 to 40 rows, a crash after a Kafka commit (before the
// slot is confirmed), a clean restart: every row once, keys in order, and
// no row marked after the hand-over.
func TestReplicationSourceExactlyOnceAcrossHandOverAndCrashes(t *testing.T) {
	db := logicalDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	keys := []string{"acct-1", "acct-2", "acct-3", "acct-4", "acct-5"}
	want := db.Insert(t, topic, 30, keys) // before the slot exists
	cfg := testenv.RelayConfig(db, k)
	cfg.Source = "replication"
	cfg.DeadLetterOrder = "skip"
	cfg.BatchSize = 25

	var armed atomic.Bool
	var commits atomic.Int64
	crash := func(_ context.Context, name string, _ int32, _ []int64) error {
		if armed.Load() && name == relay.FailAfterCommit && commits.Add(1) == 3 {
			return errors.New("crash after the Kafka commit, before the slot is confirmed")
		}
		return nil
	}
	c := k.NewConsumer(t, topic)
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	c.WaitFor(t, len(want), 30*time.Second) // the hand-over drained the rows written before
	handedOver := want[len(want)-1]
	armed.Store(true)
	for i := 1; i <= 8; i++ {
		want = append(want, db.Insert(t, topic, i*5, keys)...)
	}
	if err := first.Wait(t, 60*time.Second); err == nil {
		t.Fatal("the relay did not stop at its failpoint")
	}
	for i := 0; i < 5; i++ {
		want = append(want, db.Insert(t, topic, 1, keys)...)
	}
	second := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want = append(want, db.Insert(t, topic, 40, keys)...)
	time.Sleep(2 * time.Second)
	if err := second.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	want = append(want, db.Insert(t, topic, 7, keys)...)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	testenv.CheckExactlyOnce(t, want, c.WaitFor(t, len(want), 30*time.Second))
	var marked int
	if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE published_at IS NOT NULL AND id > $1`, handedOver).Scan(&marked); err != nil {
		t.Fatal(err)
	}
	if marked != 0 {
		t.Fatalf("%d rows written after the hand-over were marked: the replication source marks none", marked)
	}
}
