package integration

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestMarksSurviveADatabaseCrashWithSynchronousCommitOff: the relay's role
// has synchronous_commit=off, a common throughput setting, so PostgreSQL
// acknowledges a commit before its WAL is flushed. The relay publishes two
// batches and marks them; PostgreSQL then crashes (immediate shutdown,
// nothing flushed since). The recovery window is 1 batch here, so only the
// durability of the marks can keep the first batch from being published
// again: the relay's connections must commit at least to a local flush.
//
// It runs on a private PostgreSQL server (crashed on purpose) with the WAL
// writer slowed to 10 s and autovacuum off, so nothing else flushes the
// marks before the crash.
func TestMarksSurviveADatabaseCrashWithSynchronousCommitOff(t *testing.T) {
	ctx := context.Background()
	pg, admin, relayPool := asyncServer(t, "relay")
	relayURL := pg.URL("relay", "postgres")
	var level string
	if err := relayPool.QueryRow(ctx, `SHOW synchronous_commit`).Scan(&level); err != nil || level != "off" {
		t.Fatalf("the relay role's synchronous_commit is %q (%v), want off for this test", level, err)
	}

	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	rows := &testenv.DB{URL: pg.URL("postgres", "postgres"), Pool: admin, Table: outbox.DefaultTable}
	ids := rows.Insert(t, topic, 10, nil) // committed and flushed (synchronous_commit=on for postgres)
	cfg := testenv.RelayConfig(&testenv.DB{URL: relayURL, Pool: relayPool, Table: outbox.DefaultTable}, k)
	cfg.BatchSize = 5
	cfg.RecoveryWindow = 1
	testenv.StartRelay(t, &testenv.DB{URL: relayURL, Pool: relayPool, Table: outbox.DefaultTable}, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	faultsEventually(t, 30*time.Second, "both batches are marked", func() bool { return rows.Unpublished(t) == 0 })
	pg.Crash()
	pg.Start()

	faultsEventually(t, 60*time.Second, "every row is marked after the crash", func() bool {
		var n int
		err := admin.QueryRow(ctx, `SELECT count(*) FROM outbox WHERE published_at IS NULL`).Scan(&n)
		return err == nil && n == 0
	})
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 20*time.Second))
}

// asyncServer is a private PostgreSQL server on which only commits that
// are flushed survive a crash, and little else flushes: the WAL writer
// slowed to 10 s, autovacuum off. It has a migrated outbox and a role, role,
// whose commits are asynchronous (synchronous_commit=off). It returns the
// server, a pool as postgres (synchronous commits) and a pool as role.
func asyncServer(t *testing.T, role string) (*testenv.PrivatePostgres, *pgxpool.Pool, *pgxpool.Pool) {
	t.Helper()
	ctx := context.Background()
	pg := testenv.StartPrivatePostgres(t, "wal_writer_delay=10000", "wal_writer_flush_after=1GB", "autovacuum=off")
	admin, err := pgxpool.New(ctx, pg.URL("postgres", "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(admin.Close)
	for _, q := range []string{`CREATE ROLE ` + role + ` LOGIN SUPERUSER`, `ALTER ROLE ` + role + ` SET synchronous_commit = off`} {
		if _, err := admin.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	m, err := migrations.New(admin, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatal(err)
	}
	async, err := pgxpool.New(ctx, pg.URL(role, "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(async.Close)
	return pg, admin, async
}
