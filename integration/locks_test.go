package integration

import (
	"context"
	"regexp"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestOutsideLockOnTheOutboxShowsAsAFailingShard: an operator's transaction
// holds ACCESS EXCLUSIVE on the outbox table (an ALTER TABLE waiting on
// something, a forgotten LOCK). The relay's read runs under lock_timeout
// (OUTBOX_LOCK_TIMEOUT), so the shard does not hang silently while it keeps
// ownership: its batches fail, outbox_relay_shard_consecutive_failures
// climbs and each failure is logged; once the lock goes, the rows flow,
// each once.
func TestOutsideLockOnTheOutboxShowsAsAFailingShard(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.LockTimeout = 200 * time.Millisecond
	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	first := db.Insert(t, topic, 5, nil)
	faultsEventually(t, 30*time.Second, "the first rows are published", func() bool { return db.Unpublished(t) == 0 })

	tx, err := db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // released below
	if _, err := tx.Exec(ctx, `LOCK TABLE outbox IN ACCESS EXCLUSIVE MODE`); err != nil {
		t.Fatal(err)
	}
	failures := func() float64 { return faultsMetric(t, reg, "outbox_relay_shard_consecutive_failures") }
	faultsEventually(t, 30*time.Second, "the locked shard's failures climb to 2", func() bool { return failures() >= 2 })
	if !faultsLogHas(logs.String(), "shard recovering after error", "lock timeout") {
		t.Error("no log line names the lock timeout")
	}
	// The wait before the retry is a duration an operator reads ("200ms"),
	// not nanoseconds (200000000).
	if m := regexp.MustCompile(`"retry_in":([^,}]*)`).FindStringSubmatch(logs.String()); m == nil || !regexp.MustCompile(`^"[0-9.]+(ms|s)"$`).MatchString(m[1]) {
		t.Errorf("retry_in is logged as %v, want a duration such as \"200ms\"", m)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	more := db.Insert(t, topic, 5, nil)
	faultsEventually(t, 30*time.Second, "the rows flow once the lock is gone", func() bool { return db.Unpublished(t) == 0 })
	faultsEventually(t, 10*time.Second, "the failures gauge returns to 0", func() bool { return failures() == 0 })
	testenv.CheckExactlyOnce(t, append(first, more...), k.NewConsumer(t, topic).WaitFor(t, len(first)+len(more), 30*time.Second))
}
