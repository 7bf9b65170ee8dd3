package integration

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/faultproxy"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// kafkaTakeoverBound is the README's bound on how long publishing stops when
// the owner loses Kafka while its PostgreSQL connections stay up:
// 0.9 x transaction.timeout.ms (the longest Kafka step the owner's lease
// covers) + 2 x OUTBOX_OWNER_LEASE (the lease expiring, and the recovery's
// database step) + 3 x OUTBOX_REBALANCE_INTERVAL (the standby's ticks: end
// the stale session, take the shard).
func kafkaTakeoverBound(cfg relay.Config) time.Duration {
	return cfg.TransactionTimeout*9/10 + 2*cfg.OwnerLease + 3*cfg.RebalanceInterval
}

// TestKafkaPartitionedOwnerLosesItsShardToTheStandby: two relays, each
// reaching Kafka through its own fault proxy, share one shard. The owner's
// proxy freezes (TCP up, nothing answered) while its PostgreSQL connections
// stay up. Publishing resumes on the standby within kafkaTakeoverBound, and
// the cut-off owner does not take the shard back while its Kafka is still
// unreachable: rows written during the rest of the partition are published
// by the standby promptly. Once thawed, every row is in Kafka exactly once.
func TestKafkaPartitionedOwnerLosesItsShardToTheStandby(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	base := testenv.RelayConfig(db, k)
	base.BatchSize = 20
	base.OwnerLease = 3 * time.Second
	bound := kafkaTakeoverBound(base)

	proxies := make([]*faultproxy.Proxy, 2)
	regs := make([]*prometheus.Registry, 2)
	for i := range proxies {
		p, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		proxies[i] = p
		regs[i] = prometheus.NewRegistry()
	}
	start := func(i int) {
		cfg := base
		cfg.KafkaBrokers = proxies[i].Addrs()
		testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(regs[i]))
	}
	owned := func(i int) float64 { return faultsMetric(t, regs[i], "outbox_relay_owned_shards") }

	c := k.NewConsumer(t, topic)
	var ids []int64
	ids = append(ids, db.Insert(t, topic, 20, faultsKeys)...)
	start(0)
	faultsEventually(t, 30*time.Second, "the first relay publishes", func() bool { return db.Unpublished(t) == 0 })
	start(1)
	time.Sleep(time.Second) // the standby is a member, with nothing to own
	if owned(0) != 1 || owned(1) != 0 {
		t.Fatalf("owned shards %v and %v, want the first relay to own the shard", owned(0), owned(1))
	}

	proxies[0].Freeze()
	frozen := time.Now()
	ids = append(ids, db.Insert(t, topic, 20, faultsKeys)...)
	deadline := frozen.Add(bound + 30*time.Second)
	for db.Unpublished(t) > 0 && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	took := time.Since(frozen)
	t.Logf("publishing resumed %v after the owner's Kafka froze (bound %v); owned shards: cut-off %v, standby %v",
		took.Round(10*time.Millisecond), bound, owned(0), owned(1))
	if db.Unpublished(t) > 0 || took > bound {
		t.Fatalf("the rows written after the owner's Kafka froze were published %v later (%d still unpublished), want within the bound %v",
			took.Round(10*time.Millisecond), db.Unpublished(t), bound)
	}

	// The rest of the partition: the cut-off owner must not take the shard
	// back. Rows written now are published by the standby, each round soon.
	rest := time.Now().Add(bound)
	for round := 0; time.Now().Before(rest); round++ {
		ids = append(ids, db.Insert(t, topic, 5, faultsKeys)...)
		w := time.Now()
		for db.Unpublished(t) > 0 && time.Since(w) < 5*time.Second {
			time.Sleep(50 * time.Millisecond)
		}
		if n := db.Unpublished(t); n > 0 {
			t.Fatalf("%v into the partition (round %d): %d rows unpublished after 5s; owned shards: cut-off %v, standby %v: the cut-off owner took the shard back",
				time.Since(frozen).Round(time.Second), round, n, owned(0), owned(1))
		}
		time.Sleep(500 * time.Millisecond)
	}
	if owned(0) != 0 || owned(1) != 1 {
		t.Fatalf("owned shards at the end of the partition: cut-off %v, standby %v; want the standby to own the shard", owned(0), owned(1))
	}
	proxies[0].Thaw()
	ids = append(ids, db.Insert(t, topic, 20, faultsKeys)...)
	faultsEventually(t, 60*time.Second, "every row marked after the thaw", func() bool { return db.Unpublished(t) == 0 })
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 60*time.Second))
}

// TestKafkaPartitionedFromEveryInstanceIsTakenAgainWhenKafkaReturns: both
// instances lose Kafka (their PostgreSQL connections stay up) for longer
// than the take-over bound, so each gives the shard up and closes its gate.
// Once Kafka answers again, one of them takes the shard and publishes within
// the bound (liveness: the gate reopens with the first successful probe),
// and every row is in Kafka exactly once.
func TestKafkaPartitionedFromEveryInstanceIsTakenAgainWhenKafkaReturns(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	base := testenv.RelayConfig(db, k)
	base.BatchSize = 20
	base.OwnerLease = 3 * time.Second
	bound := kafkaTakeoverBound(base)

	proxies := make([]*faultproxy.Proxy, 2)
	regs := make([]*prometheus.Registry, 2)
	for i := range proxies {
		p, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(p.Close)
		proxies[i] = p
		regs[i] = prometheus.NewRegistry()
		cfg := base
		cfg.KafkaBrokers = p.Addrs()
		testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(regs[i]))
	}
	c := k.NewConsumer(t, topic)
	ids := db.Insert(t, topic, 20, faultsKeys)
	faultsEventually(t, 30*time.Second, "the rows before the partition are published", func() bool { return db.Unpublished(t) == 0 })

	for _, p := range proxies {
		p.Freeze()
	}
	ids = append(ids, db.Insert(t, topic, 20, faultsKeys)...)
	time.Sleep(bound + 5*time.Second)
	if n := db.Unpublished(t); n != 20 {
		t.Fatalf("%d rows unpublished during the partition of every instance, want the 20 written after it began", n)
	}
	owned := faultsMetric(t, regs[0], "outbox_relay_owned_shards") + faultsMetric(t, regs[1], "outbox_relay_owned_shards")
	t.Logf("during the partition of both instances, shards owned: %v", owned)

	for _, p := range proxies {
		p.Thaw()
	}
	thawed := time.Now()
	faultsEventually(t, bound+30*time.Second, "every row marked after Kafka returned", func() bool { return db.Unpublished(t) == 0 })
	took := time.Since(thawed)
	t.Logf("publishing resumed %v after Kafka returned to both instances (bound %v)", took.Round(10*time.Millisecond), bound)
	if took > bound {
		t.Fatalf("publishing resumed %v after Kafka returned, want within %v", took.Round(10*time.Millisecond), bound)
	}
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 60*time.Second))
}
