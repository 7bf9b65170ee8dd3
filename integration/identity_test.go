package integration

// What every relay of one table must share (the shard count, the relay name,
// the checkpoint topic) and how it changes: only through `outbox-relay
// reshard`, with no relay running, checked after the membership lock is
// granted so that no relay slips past a reshard in progress.

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
)

// identityRelay is a relay run by a test that wants to see both how it ends
// and whether it took shards meanwhile.
type identityRelay struct {
	reg  *prometheus.Registry
	logs *testenv.SyncBuffer
	done chan error
	stop context.CancelFunc
}

func startIdentityRelay(t *testing.T, db *testenv.DB, cfg relay.Config, opts ...relay.Option) *identityRelay {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), db.URL)
	if err != nil {
		t.Fatal(err)
	}
	ir := &identityRelay{reg: prometheus.NewRegistry(), logs: &testenv.SyncBuffer{}, done: make(chan error, 1)}
	opts = append([]relay.Option{relay.WithLogger(testenv.Logger(t, ir.logs)), relay.WithRegisterer(ir.reg)}, opts...)
	r, err := relay.New(cfg, pool, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	ir.stop = cancel
	go func() { ir.done <- r.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-ir.done:
		case <-time.After(30 * time.Second):
			t.Errorf("relay did not stop within 30s")
		}
		pool.Close()
	})
	return ir
}

func (ir *identityRelay) owned(t *testing.T) float64 {
	return counter(t, ir.reg, "outbox_relay_owned_shards", nil)
}

// mustRefuse waits until the relay's Run returns an error containing every
// part, and fails the test if it owns a shard first or keeps running.
func (ir *identityRelay) mustRefuse(t *testing.T, what string, parts ...string) error {
	t.Helper()
	deadline := time.After(20 * time.Second)
	for {
		select {
		case err := <-ir.done:
			ir.done <- err // for the cleanup
			if err == nil {
				t.Fatalf("%s: Run returned nil, want an error", what)
			}
			for _, p := range parts {
				if !strings.Contains(err.Error(), p) {
					t.Fatalf("%s: Run returned %q, want an error naming %q", what, err, p)
				}
			}
			return err
		case <-deadline:
			t.Fatalf("%s: the relay still runs after 20s (owns %v shards), want it to refuse", what, ir.owned(t))
		case <-time.After(20 * time.Millisecond):
			if n := ir.owned(t); n > 0 {
				t.Fatalf("%s: the relay took %v shards and runs, want it to refuse to run", what, n)
			}
		}
	}
}

// runUntilOwned runs a relay with cfg until it owns n shards and the table is
// drained, then stops it cleanly.
func runUntilOwned(t *testing.T, db *testenv.DB, cfg relay.Config, n float64) {
	t.Helper()
	ir := startIdentityRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the relay owns its shards and drains the table", func() bool {
		return ir.owned(t) == n && db.Unpublished(t) == 0
	})
	ir.stop()
	if err := <-ir.done; err != nil {
		t.Fatalf("clean stop: %v", err)
	}
	ir.done <- nil // for the cleanup
}

// membershipLock takes the table's membership lock exclusively, as
// `outbox-relay reshard` does, on a connection of its own.
func membershipLock(t *testing.T, db *testenv.DB) *pgx.Conn {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, db.URL)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close(context.Background()) })
	for deadline := time.Now().Add(20 * time.Second); ; {
		var got bool
		if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, migrations.LockKey+2, db.Table.String()).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got {
			return conn
		}
		if time.Now().After(deadline) {
			t.Fatal("the membership lock stayed taken for 20s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// waitForMembershipWaiter waits until some session waits for the membership
// lock.
func waitForMembershipWaiter(t *testing.T, db *testenv.DB) {
	t.Helper()
	faultsEventually(t, 20*time.Second, "a relay waits for the membership lock", func() bool {
		var waiting bool
		if err := db.Pool.QueryRow(context.Background(), `SELECT EXISTS (SELECT FROM pg_locks WHERE locktype = 'advisory' AND NOT granted
  AND classid::bigint = $1 AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))`,
			int64(migrations.LockKey+2)).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting
	})
}

// TestRelayStartedDuringReshardStopsWithTheNewCount: a relay started with the
// old OUTBOX_SHARDS while `reshard` runs (reshard holds the membership lock
// exclusively) waits for the lock; by the time it is granted the new count is
// recorded. It must check the count then, and stop, instead of running with
// the old count beside relays with the new one (two transactional ids
// publishing the same rows).
func TestRelayStartedDuringReshardStopsWithTheNewCount(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 2, "payments")
	cfg := testenv.RelayConfig(db, k)
	db.Insert(t, "payments", 5, []string{"a", "b"})
	runUntilOwned(t, db, cfg, 1)

	lock := membershipLock(t, db) // reshard begins
	late := startIdentityRelay(t, db, cfg)
	waitForMembershipWaiter(t, db)
	ids := db.Insert(t, "payments", 10, []string{"a", "b", "c"})
	// Reshard has recovered the old shard; it records the new count and
	// ends, releasing the lock.
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox_relay_state SET shards = 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := lock.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, migrations.LockKey+2, db.Table.String()); err != nil {
		t.Fatal(err)
	}
	err := late.mustRefuse(t, "relay started with OUTBOX_SHARDS=1 during a reshard to 2", "OUTBOX_SHARDS is 1", "split into 2 shards", "outbox-relay reshard")
	if !errors.Is(err, relay.ErrShardsChanged) {
		t.Errorf("Run returned %v, want it to wrap relay.ErrShardsChanged", err)
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Errorf("%d rows were published under the old shard count, want none", len(ids)-n)
	}
}

// TestOwnershipReconnectRechecksTheShardCount: a running relay loses its
// ownership connection; a reshard takes the membership lock meanwhile and
// records a new count. When the relay's new connection is granted the
// membership lock, it must check the count again and stop.
func TestOwnershipReconnectRechecksTheShardCount(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 2, "payments")
	cfg := testenv.RelayConfig(db, k)
	running := startIdentityRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the relay owns the shard", func() bool { return running.owned(t) == 1 })

	// Cut the relay's ownership connection and take the membership lock
	// before it reconnects (or again, if it was faster).
	var lock *pgx.Conn
	for deadline := time.Now().Add(20 * time.Second); lock == nil; {
		if _, err := db.Pool.Exec(ctx, `SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory' AND granted
  AND classid::bigint = $1 AND objsubid = 2 AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`,
			int64(migrations.LockKey+2)); err != nil {
			t.Fatal(err)
		}
		c, err := pgx.Connect(ctx, db.URL)
		if err != nil {
			t.Fatal(err)
		}
		var got bool
		if err := c.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, migrations.LockKey+2, db.Table.String()).Scan(&got); err != nil {
			t.Fatal(err)
		}
		if got {
			lock = c
			t.Cleanup(func() { c.Close(context.Background()) })
			break
		}
		c.Close(ctx)
		if time.Now().After(deadline) {
			t.Fatal("could not take the membership lock from the relay within 20s")
		}
	}
	waitForMembershipWaiter(t, db)
	ids := db.Insert(t, "payments", 10, []string{"a", "b", "c"})
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox_relay_state SET shards = 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := lock.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, migrations.LockKey+2, db.Table.String()); err != nil {
		t.Fatal(err)
	}
	deadline := time.After(20 * time.Second)
	for {
		select {
		case err := <-running.done:
			if !errors.Is(err, relay.ErrShardsChanged) || !strings.Contains(err.Error(), "outbox-relay reshard") {
				t.Fatalf("after the reconnect Run returned %v, want ErrShardsChanged naming the fix", err)
			}
			if n := db.Unpublished(t); n != len(ids) {
				t.Errorf("%d rows were published under the old shard count after the reshard, want none", len(ids)-n)
			}
			running.done <- err // for the cleanup
			return
		case <-deadline:
			t.Fatalf("the relay reconnected after a reshard to 2 shards and still runs with OUTBOX_SHARDS=1 (owns %v shards, %d of %d new rows published)",
				running.owned(t), len(ids)-db.Unpublished(t), len(ids))
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// checkpointPartitions returns the partition count of topic.
func checkpointPartitions(t *testing.T, k *testenv.Kafka, topic string) int {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	topics, err := k.Admin(t).ListTopics(ctx, topic)
	if err != nil {
		t.Fatal(err)
	}
	td, ok := topics[topic]
	if !ok || td.Err != nil {
		t.Fatalf("checkpoint topic %s: %v", topic, td.Err)
	}
	return len(td.Partitions)
}

// TestReshardGrowsTheCheckpointTopicInEveryMode: a reshard done in
// at-least-once mode (which writes no checkpoints) must still grow the
// checkpoint topic, so that exactly-once starts after a reshard back to it;
// and a reshard with an unchanged count repairs a topic left too small.
func TestReshardGrowsTheCheckpointTopicInEveryMode(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "payments")
	cfg := testenv.RelayConfig(db, k)
	keys := []string{"a", "b", "c", "d", "e", "f"}
	ids := db.Insert(t, "payments", 20, keys)
	runUntilOwned(t, db, cfg, 1) // exactly-once, one shard: a topic of one partition

	alo := cfg
	alo.Delivery, alo.Shards = "at-least-once", 2
	rs, err := relay.New(alo, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Reshard(ctx); err != nil {
		t.Fatalf("reshard in at-least-once mode: %v", err)
	}
	if n := checkpointPartitions(t, k, cfg.CheckpointTopic); n != 2 {
		t.Fatalf("after a reshard to 2 shards in at-least-once mode the checkpoint topic has %d partitions, want 2", n)
	}
	// The mode is recorded too: exactly-once runs again after a reshard
	// back to it, which finds something to do.
	eo := cfg
	eo.Shards = 2
	back, err := relay.New(eo, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if old, err := back.Reshard(ctx); err != nil || old.Delivery != "at-least-once" {
		t.Fatalf("reshard back to exactly-once: recorded %+v, %v", old, err)
	}
	back.Close()
	more := db.Insert(t, "payments", 20, keys)
	runUntilOwned(t, db, eo, 2)

	// A table left drifted by an older relay: 3 shards recorded, the topic
	// still 2 partitions. A reshard with the same count repairs it.
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox_relay_state SET shards = 3`); err != nil {
		t.Fatal(err)
	}
	eo.Shards = 3
	rs3, err := relay.New(eo, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs3.Reshard(ctx); err != nil {
		t.Fatalf("reshard with an unchanged count: %v", err)
	}
	if n := checkpointPartitions(t, k, cfg.CheckpointTopic); n != 3 {
		t.Fatalf("a reshard with an unchanged count of 3 left the checkpoint topic with %d partitions, want 3", n)
	}
	last := db.Insert(t, "payments", 20, keys)
	runUntilOwned(t, db, eo, 3)
	all := append(append(append([]int64(nil), ids...), more...), last...)
	testenv.CheckExactlyOnce(t, all, k.NewConsumer(t, "payments").WaitFor(t, len(all), 30*time.Second))
}

// TestRelayNameAndCheckpointTopicMustMatchTheRecordedOnes: two instances of
// one table with another OUTBOX_RELAY_NAME (other transactional ids) or
// another OUTBOX_CHECKPOINT_TOPIC never fence each other and would publish
// the same rows. The first relay records both; one with other values
// refuses to run, naming both values, the variable and the way out.
func TestRelayNameAndCheckpointTopicMustMatchTheRecordedOnes(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	cfg := testenv.RelayConfig(db, k)
	db.Insert(t, "payments", 5, nil)
	runUntilOwned(t, db, cfg, 1)
	ids := db.Insert(t, "payments", 5, nil)

	other := cfg
	other.RelayName = "another-relay"
	startIdentityRelay(t, db, other).mustRefuse(t, "relay with another OUTBOX_RELAY_NAME",
		"OUTBOX_RELAY_NAME", `"another-relay"`, `"`+cfg.RelayName+`"`, "outbox-relay reshard")

	other = cfg
	other.CheckpointTopic = "another-checkpoints"
	startIdentityRelay(t, db, other).mustRefuse(t, "relay with another OUTBOX_CHECKPOINT_TOPIC",
		"OUTBOX_CHECKPOINT_TOPIC", `"another-checkpoints"`, `"`+cfg.CheckpointTopic+`"`, "outbox-relay reshard")
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("%d rows were published by the refused relays", len(ids)-n)
	}
}

// TestReshardChangesRelayNameAndCheckpointTopic: the documented way to change
// the relay name or the checkpoint topic. The old relay committed a batch and
// died before marking it; `reshard` with the new values recovers the old
// shard under the recorded (old) name and topic, which marks the batch, then
// records the new values. The relay with the new name publishes the rest,
// and nothing is published twice.
func TestReshardChangesRelayNameAndCheckpointTopic(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 2, "payments")
	cfg := testenv.RelayConfig(db, k)
	keys := []string{"a", "b", "c", "d"}
	ids := db.Insert(t, "payments", 30, keys)
	crash := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name == relay.FailAfterCommit {
			return errSimulatedCrash
		}
		return nil
	}
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay returned %v, want the simulated crash", err)
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("%d rows unpublished after the crash, want %d (committed in Kafka, not marked)", n, len(ids))
	}

	renamed := cfg
	renamed.RelayName = testenv.RandomName("renamed-")
	renamed.CheckpointTopic = testenv.RandomName("renamed-checkpoints-")
	rs, err := relay.New(renamed, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Reshard(ctx); err != nil {
		t.Fatalf("reshard to a new name and topic: %v", err)
	}
	if n := db.Unpublished(t); n != 0 {
		t.Fatalf("%d rows unpublished after the reshard to a new relay name: the old shard's checkpoint (old name, old topic) was not applied", n)
	}
	startIdentityRelay(t, db, cfg).mustRefuse(t, "relay with the old name after the change", "OUTBOX_RELAY_NAME")

	more := db.Insert(t, "payments", 30, keys)
	runUntilOwned(t, db, renamed, 1)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, k.NewConsumer(t, "payments").WaitFor(t, len(all), 30*time.Second))
}
