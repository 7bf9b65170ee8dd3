package integration

// Rows the relay must refuse or route before they reach Kafka: a row for a
// topic that does not exist (dead-lettered at once, or the topic created when
// the operator or the broker says so), and a row that carries the relay's
// own outbox-id header. Each test checks that the refused row is in the
// dead-letter table with an error naming the cause and the fix, and that
// every other row of its batch reaches a read_committed consumer exactly
// once, quickly.
//
// They run against the in-process kfake cluster, or a real cluster when
// KAFKA_BROKERS is set; a test that needs a broker with (or without)
// auto.create.topics.enable skips on a cluster configured the other way.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// topicsModes are the delivery modes every topic test runs in.
var topicsModes = []txn.Mode{txn.ExactlyOnce, txn.AtLeastOnce, txn.AtMostOnce}

// topicsBatch is the batch the topic tests write: 499 rows of topic (keys
// cycling over faultsKeys) with one row of other in the middle, 500 rows in
// all, read as one batch (OUTBOX_BATCH_SIZE=500).
const topicsBatch = 500

// topicsInsert writes topicsBatch rows: 250 of topic, one of other, 249 of
// topic. It returns the ids of topic's rows and the id of other's row.
func topicsInsert(t *testing.T, db *testenv.DB, topic, other string) (good []int64, odd int64) {
	t.Helper()
	good = db.Insert(t, topic, topicsBatch/2, faultsKeys)
	odd = db.Insert(t, other, 1, []string{"acct-odd"})[0]
	good = append(good, db.Insert(t, topic, topicsBatch/2-1, faultsKeys)...)
	return good, odd
}

// topicsBrokerAutoCreates reports whether the real cluster k auto-creates
// topics: its brokers' auto.create.topics.enable when they report it, else
// what a metadata request asking for a new topic does (the probe topic is
// deleted again).
func topicsBrokerAutoCreates(t *testing.T, k *testenv.Kafka) bool {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	adm := k.Admin(t)
	if rcs, err := adm.DescribeBrokerConfigs(ctx); err == nil {
		for _, rc := range rcs {
			for _, c := range rc.Configs {
				if c.Key == "auto.create.topics.enable" && c.Value != nil {
					return *c.Value == "true"
				}
			}
		}
	}
	probe := testenv.RandomName("autocreate-probe-")
	req := kmsg.NewPtrMetadataRequest()
	req.AllowAutoTopicCreation = true
	rt := kmsg.NewMetadataRequestTopic()
	rt.Topic = kmsg.StringPtr(probe)
	req.Topics = append(req.Topics, rt)
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if _, err := req.RequestWith(ctx, cl); err != nil {
		t.Fatalf("auto-creation probe: %v", err)
	}
	time.Sleep(time.Second) // a creation may take the controller a moment
	created := topicsPartitions(t, k, probe) >= 0
	if created {
		_, _ = adm.DeleteTopics(ctx, probe)
	}
	return created
}

// topicsKafka returns a cluster whose brokers auto-create topics when
// autoCreate is set, and do not otherwise: a kfake cluster built so, or the
// real cluster of KAFKA_BROKERS when it is configured so (else the test is
// skipped).
func topicsKafka(t *testing.T, autoCreate bool, topics ...string) *testenv.Kafka {
	t.Helper()
	if testenv.RealBrokers() != nil {
		k := testenv.NewKafka(t, 3, topics...)
		if got := topicsBrokerAutoCreates(t, k); got != autoCreate {
			t.Skipf("this test needs a cluster with auto.create.topics.enable=%v; the cluster of KAFKA_BROKERS has %v", autoCreate, got)
		}
		return k
	}
	opts := []kfake.Opt{kfake.NumBrokers(3), kfake.DefaultNumPartitions(3)}
	if autoCreate {
		opts = append(opts, kfake.AllowAutoTopicCreation())
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		t.Fatalf("kfake: %v", err)
	}
	t.Cleanup(c.Close)
	k := &testenv.Kafka{Cluster: c, Brokers: c.ListenAddrs()}
	if len(topics) > 0 {
		k.CreateTopics(t, 3, topics...)
	}
	return k
}

// topicsPartitions returns the partition count of topic, or -1 when the
// cluster does not know it.
func topicsPartitions(t *testing.T, k *testenv.Kafka, topic string) int {
	t.Helper()
	td, err := k.Admin(t).ListTopics(context.Background(), topic)
	if err != nil {
		t.Fatalf("list topics: %v", err)
	}
	d, ok := td[topic]
	if !ok || d.Err != nil {
		return -1
	}
	return len(d.Partitions)
}

// topicsWaitSettled waits until no row is left unpublished and returns how
// long that took from start.
func topicsWaitSettled(t *testing.T, db *testenv.DB, start time.Time) time.Duration {
	t.Helper()
	// Generous, so that a slow relay is measured rather than cut off; the
	// bound the guarantee sets is asserted by the caller.
	faultsEventually(t, 4*time.Minute, "every row published or dead-lettered", func() bool { return db.Unpublished(t) == 0 })
	return time.Since(start)
}

// topicsFastBound is how soon the 499 other rows of a batch must be
// published when one row's topic is missing.
const topicsFastBound = 15 * time.Second

// TestMissingTopicRowIsDeadLetteredAtOnceAndTheBatchFlows: one row of a
// 500-row batch names a topic that does not exist, on a cluster that does
// not auto-create topics and with OUTBOX_CREATE_TOPICS off. The relay finds
// the missing topic from metadata before producing: the row goes to the
// dead-letter table at once with an error naming the topic and the fix, and
// the 499 others reach a read_committed consumer exactly once within
// seconds, in every delivery mode. The topic is not created.
func TestMissingTopicRowIsDeadLetteredAtOnceAndTheBatchFlows(t *testing.T) {
	for _, mode := range topicsModes {
		t.Run(string(mode), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic, missing := testenv.RandomName("payments-"), testenv.RandomName("missing-")
			k := topicsKafka(t, false, topic)
			good, bad := topicsInsert(t, db, topic, missing)
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = string(mode)
			cfg.BatchSize = topicsBatch
			reg := prometheus.NewRegistry()

			start := time.Now()
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
			took := topicsWaitSettled(t, db, start)
			t.Logf("%s: %d rows published and 1 dead-lettered %v after the relay started", mode, len(good), took.Round(time.Millisecond))

			dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(dead) != 1 || dead[0].ID != bad || dead[0].Topic != missing {
				t.Fatalf("dead letters = %+v, want only row %d of topic %s", dead, bad, missing)
			}
			for _, frag := range []string{missing, "does not exist", "create the topic", "OUTBOX_CREATE_TOPICS=true"} {
				if !strings.Contains(dead[0].Error, frag) {
					t.Errorf("dead letter error %q does not contain %q", dead[0].Error, frag)
				}
			}
			testenv.CheckExactlyOnce(t, good, k.NewConsumer(t, topic).WaitFor(t, len(good), 30*time.Second))
			if took > topicsFastBound {
				t.Errorf("the other %d rows took %v, more than %v: the missing topic held the batch", len(good), took.Round(time.Millisecond), topicsFastBound)
			}
			if got := faultsMetric(t, reg, "outbox_relay_dead_letters_total"); got != 1 {
				t.Errorf("dead_letters_total = %v, want 1", got)
			}
			if got := faultsMetric(t, reg, "outbox_relay_at_most_once_lost_rows_total"); got != 0 {
				t.Errorf("at_most_once_lost_rows_total = %v: a row for a missing topic was marked and lost instead of dead-lettered", got)
			}
			if n := topicsPartitions(t, k, missing); n >= 0 {
				t.Errorf("topic %s exists with %d partitions: the relay created it with OUTBOX_CREATE_TOPICS off", missing, n)
			}
		})
	}
}

// TestBrokerAutoCreationIsHonoured: on a cluster with
// auto.create.topics.enable=true, a row for a new topic is published, not
// dead-lettered: the relay's metadata requests ask for auto-creation, as
// Kafka's Java producer does by default. Every row of the batch reaches a
// read_committed consumer exactly once, in every delivery mode.
func TestBrokerAutoCreationIsHonoured(t *testing.T) {
	for _, mode := range topicsModes {
		t.Run(string(mode), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic, fresh := testenv.RandomName("payments-"), testenv.RandomName("fresh-")
			k := topicsKafka(t, true, topic)
			good, odd := topicsInsert(t, db, topic, fresh)
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = string(mode)
			cfg.BatchSize = topicsBatch

			start := time.Now()
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			took := topicsWaitSettled(t, db, start)
			t.Logf("%s: %d rows settled %v after the relay started", mode, topicsBatch, took.Round(time.Millisecond))

			dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(dead) != 0 {
				t.Fatalf("dead letters = %+v, want none: the broker auto-creates topics", dead)
			}
			all := append([]int64{odd}, good...)
			testenv.CheckExactlyOnce(t, all, k.NewConsumer(t, topic, fresh).WaitFor(t, len(all), 30*time.Second))
			if took > topicsFastBound {
				t.Errorf("the batch took %v, more than %v", took.Round(time.Millisecond), topicsFastBound)
			}
		})
	}
}

// TestCreateTopicsSettingCreatesTheMissingTopic: with OUTBOX_CREATE_TOPICS=true
// on a cluster that does not auto-create topics, the relay creates the topic
// a row names, with OUTBOX_CREATE_TOPIC_PARTITIONS partitions and
// OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR replicas, and publishes the row:
// every row of the batch reaches a read_committed consumer exactly once, in
// every delivery mode.
func TestCreateTopicsSettingCreatesTheMissingTopic(t *testing.T) {
	for _, mode := range topicsModes {
		t.Run(string(mode), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic, fresh := testenv.RandomName("payments-"), testenv.RandomName("fresh-")
			k := topicsKafka(t, false, topic)
			brokers, err := k.Admin(t).ListBrokers(ctx)
			if err != nil {
				t.Fatal(err)
			}
			rf := min(2, len(brokers))
			good, odd := topicsInsert(t, db, topic, fresh)
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = string(mode)
			cfg.BatchSize = topicsBatch
			cfg.CreateTopics, cfg.CreateTopicPartitions, cfg.CreateTopicReplicationFactor = true, 5, rf

			start := time.Now()
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			took := topicsWaitSettled(t, db, start)
			t.Logf("%s: %d rows settled %v after the relay started", mode, topicsBatch, took.Round(time.Millisecond))

			dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
			if err != nil {
				t.Fatal(err)
			}
			if len(dead) != 0 {
				t.Fatalf("dead letters = %+v, want none: OUTBOX_CREATE_TOPICS=true", dead)
			}
			td, err := k.Admin(t).ListTopics(ctx, fresh)
			if err != nil || td[fresh].Err != nil {
				t.Fatalf("topic %s: %v %v", fresh, err, td[fresh].Err)
			}
			if n := len(td[fresh].Partitions); n != 5 {
				t.Errorf("topic %s has %d partitions, want 5 (OUTBOX_CREATE_TOPIC_PARTITIONS)", fresh, n)
			}
			for _, p := range td[fresh].Partitions {
				if len(p.Replicas) != rf {
					t.Errorf("partition %d of %s has %d replicas, want %d (OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR)", p.Partition, fresh, len(p.Replicas), rf)
				}
			}
			all := append([]int64{odd}, good...)
			testenv.CheckExactlyOnce(t, all, k.NewConsumer(t, topic, fresh).WaitFor(t, len(all), 30*time.Second))
			if took > topicsFastBound {
				t.Errorf("the batch took %v, more than %v", took.Round(time.Millisecond), topicsFastBound)
			}
		})
	}
}

// TestTopicDeletedAfterItWasCheckedDoesNotStallTheShard: a topic the relay
// has published to (and knows) is deleted; rows for it written afterwards
// are dead-lettered with an error naming the topic, and the rows of the
// other topic beside them are published exactly once: the shard does not
// retry the gone topic forever.
func TestTopicDeletedAfterItWasCheckedDoesNotStallTheShard(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic, doomed := testenv.RandomName("payments-"), testenv.RandomName("doomed-")
	k := topicsKafka(t, false, topic, doomed)
	first := db.Insert(t, doomed, 10, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = topicsBatch
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	testenv.CheckExactlyOnce(t, first, k.NewConsumer(t, doomed).WaitFor(t, len(first), 30*time.Second))
	faultsEventually(t, 10*time.Second, "the first rows marked", func() bool { return db.Unpublished(t) == 0 })

	if _, err := k.Admin(t).DeleteTopics(ctx, doomed); err != nil {
		t.Fatal(err)
	}
	faultsEventually(t, 10*time.Second, "the topic is gone", func() bool { return topicsPartitions(t, k, doomed) < 0 })
	good, bad := topicsInsert(t, db, topic, doomed)
	start := time.Now()
	took := topicsWaitSettled(t, db, start)
	t.Logf("%d rows published and 1 dead-lettered %v after they were written", len(good), took.Round(time.Millisecond))
	dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].ID != bad || !strings.Contains(dead[0].Error, doomed) {
		t.Fatalf("dead letters = %+v, want only row %d with an error naming %s", dead, bad, doomed)
	}
	testenv.CheckExactlyOnce(t, good, k.NewConsumer(t, topic).WaitFor(t, len(good), 30*time.Second))
	if took > topicsFastBound {
		t.Errorf("the other %d rows took %v, more than %v: the gone topic held the batch", len(good), took.Round(time.Millisecond), topicsFastBound)
	}
}
