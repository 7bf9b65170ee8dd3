package integration

import (
	"context"
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
	ids := db.Insert(t, "payments", 300, keys)
	a, regA := start()
	_, regB := start()
	waitOwned("two relays, two shards each", func() bool { return owned(regA) == 2 && owned(regB) == 2 })

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
