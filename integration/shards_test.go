package integration

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestShardsAreSharedFairlyAndFailOver: with four shards and two relays,
// each relay owns two; rows of every key are published once and in order;
// when one relay stops, the other takes all four shards and carries on,
// and nothing is lost or duplicated.
func TestShardsAreSharedFairlyAndFailOver(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "payments")
	cfg := testenv.RelayConfig(db, k)
	cfg.Shards = 4
	cfg.BatchSize = 20

	start := func() (*testenv.Running, *prometheus.Registry) {
		pool, err := pgxpool.New(ctx, db.URL)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pool.Close)
		reg := prometheus.NewRegistry()
		own := &testenv.DB{URL: db.URL, Pool: pool, Table: db.Table}
		return testenv.StartRelay(t, own, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg)), reg
	}
	owned := func(reg *prometheus.Registry) float64 { return counter(t, reg, "outbox_relay_owned_shards", nil) }
	waitOwned := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(20 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("shards never settled: %s", what)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}

	keys := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"}
	a, regA := start()
	_, regB := start()
	waitOwned("two relays, two shards each", func() bool { return owned(regA) == 2 && owned(regB) == 2 })
	// Written once the shards are shared: rows written before could all
	// be drained by the first relay before the second joins.
	ids := db.Insert(t, "payments", 300, keys)

	c := k.NewConsumer(t, "payments")
	seen := c.WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	if counter(t, regA, "outbox_relay_published_records_total", nil) == 0 || counter(t, regB, "outbox_relay_published_records_total", nil) == 0 {
		t.Fatalf("one relay published nothing: the shards were not shared")
	}

	if err := a.Stop(); err != nil {
		t.Fatalf("relay A stopped with %v", err)
	}
	waitOwned("the survivor owns all four shards", func() bool { return owned(regB) == 4 })
	more := db.Insert(t, "payments", 200, keys)
	seen = c.WaitFor(t, len(ids)+len(more), 30*time.Second)
	testenv.CheckExactlyOnce(t, append(ids, more...), seen)
}

// TestShardCountChangeNeedsReshard: a relay with one shard commits a batch
// and dies before marking it. A relay started with two shards refuses to run
// (shard 1 would not read shard 0's checkpoint and would publish the batch
// again); Reshard recovers the old shard and records the new count; then two
// shards publish everything exactly once.
func TestShardCountChangeNeedsReshard(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "payments")
	cfg := testenv.RelayConfig(db, k)
	keys := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	ids := db.Insert(t, "payments", 40, keys)

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
		t.Fatalf("%d rows unpublished after the crash, want all %d (committed in Kafka, not marked)", n, len(ids))
	}

	cfg.Shards = 2
	refused := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	if err := refused.Wait(t, 30*time.Second); !errors.Is(err, relay.ErrShardsChanged) || !strings.Contains(err.Error(), "outbox-relay reshard") {
		t.Fatalf("relay with a changed OUTBOX_SHARDS returned %v, want ErrShardsChanged naming the fix", err)
	}

	// A running relay blocks a reshard.
	cfg1 := cfg
	cfg1.Shards = 1
	reg := prometheus.NewRegistry()
	running := testenv.StartRelay(t, db, cfg1, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	deadline := time.Now().Add(10 * time.Second)
	for counter(t, reg, "outbox_relay_owned_shards", nil) != 1 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	rs, err := relay.New(cfg, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rs.Reshard(context.Background()); !errors.Is(err, relay.ErrRelaysRunning) {
		t.Fatalf("reshard with a relay running returned %v, want ErrRelaysRunning", err)
	}
	if err := running.Stop(); err != nil {
		t.Fatal(err)
	}

	// The running relay above already recovered and published the batch.
	// Crash another one after its commit, then reshard.
	more := db.Insert(t, "payments", 40, keys)
	again := testenv.StartRelay(t, db, cfg1, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	if err := again.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("relay returned %v, want the simulated crash", err)
	}
	if old, err := rs.Reshard(context.Background()); err != nil || old.Shards != 1 {
		t.Fatalf("reshard: old %d shards, %v", old.Shards, err)
	}
	if n := db.Unpublished(t); n != 0 {
		t.Fatalf("%d rows unpublished after reshard: the old shard's checkpoint was not applied", n)
	}

	more2 := db.Insert(t, "payments", 40, keys)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	all := append(append(append([]int64(nil), ids...), more...), more2...)
	testenv.CheckExactlyOnce(t, all, k.NewConsumer(t, "payments").WaitFor(t, len(all), 30*time.Second))
}
