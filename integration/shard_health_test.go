package integration

// A failing shard backs off, and is seen (issue 21, section 2): a batch that
// keeps failing is retried from 100 ms up to the 10 s cap across its
// recoveries, not 8 times a second with a new producer id each time; a shard
// stopped until an operator acts is counted, recorded in the database for
// `outbox-relay status`, and kept by its instance.

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestFailingBatchBacksOffAcrossRecoveries: every commit of the shard is
// answered TRANSACTION_ABORTABLE, while recovery (InitProducerID, the
// checkpoint read) succeeds each time. The relay recovers after each failed
// commit, but its backoff grows from 100 ms to the 10 s cap across those
// recoveries: in 12 s the broker sees a handful of InitProducerID requests
// of the shard's transactional id (100+200+...+6400 ms: about 8), not one
// every ~120 ms. outbox_relay_producer_id_requests_total counts them. Once
// the fault is gone the rows are published, within the cap.
func TestFailingBatchBacksOffAcrossRecoveries(t *testing.T) {
	modesNeedControl(t, "TRANSACTION_ABORTABLE on every EndTxn")
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	cfg := testenv.RelayConfig(db, k)
	ids := db.Insert(t, topic, 10, faultsKeys)

	txnID := cfg.RelayName + "-0"
	var inits atomic.Int32
	modesInject(t, k, kmsg.InitProducerID, -1, func(req kmsg.Request) kmsg.Response {
		if id := req.(*kmsg.InitProducerIDRequest).TransactionalID; id != nil && *id == txnID {
			inits.Add(1)
		}
		return nil // counted only: the broker answers
	})
	fault := modesInject(t, k, kmsg.EndTxn, -1, modesEndTxnFailing(kerr.TransactionAbortable))
	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))

	faultsEventually(t, 30*time.Second, "the first commit is refused", func() bool { return fault.Fired() > 0 })
	before := inits.Load()
	const window = 12 * time.Second
	time.Sleep(window)
	during := inits.Load() - before
	t.Logf("InitProducerID requests of %s in %v of failing commits: %d (%d in all)", txnID, window, during, inits.Load())
	if during > 10 {
		t.Errorf("the broker saw %d InitProducerID requests of %s in %v while every commit failed: the backoff restarts at 100 ms after each recovery; want at most 10 (100 ms doubling to the 10 s cap)",
			during, txnID, window)
	}
	if during < 3 {
		t.Errorf("only %d InitProducerID requests in %v: the shard does not retry", during, window)
	}
	got := faultsMetric(t, reg, "outbox_relay_producer_id_requests_total", "shard", "0")
	if got < 1 || got > float64(inits.Load()) {
		t.Errorf("outbox_relay_producer_id_requests_total{shard=\"0\"} = %v, want between 1 and the %d the broker saw", got, inits.Load())
	}
	if f := faultsMetric(t, reg, "outbox_relay_shard_consecutive_failures", "shard", "0"); f < 3 {
		t.Errorf("shard_consecutive_failures = %v, want >= 3 after repeated failed commits", f)
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Errorf("%d of %d rows marked while no commit succeeded", len(ids)-n, len(ids))
	}

	fault.Stop()
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 40*time.Second))
	faultsEventually(t, 20*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
	faultsEventually(t, 10*time.Second, "shard_consecutive_failures back to 0", func() bool {
		return faultsMetric(t, reg, "outbox_relay_shard_consecutive_failures", "shard", "0") == 0
	})
}

// TestStoppedShardIsCountedRecordedAndKept: a foreign record in the shard's
// checkpoint partition stops the shard until an operator acts. Beyond the
// log and /readyz: outbox_relay_shard_stopped{shard} is 1, the shard's row
// in <table>_owner records when and why (stopped_at, stopped_reason), so
// that `outbox-relay status` shows it from any host, and the instance keeps
// the shard (owned_shards 1): a standby, which would stop on the same
// record, does not take it nor loop on it. Once the operator has removed the
// record and the shard is taken again, the record is cleared and the gauge
// is 0.
func TestStoppedShardIsCountedRecordedAndKept(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	db.Insert(t, topic, 3, nil)
	first := testenv.StartRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the first rows are published", func() bool { return db.Unpublished(t) == 0 })
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	res := cl.ProduceSync(ctx, &kgo.Record{Topic: cfg.CheckpointTopic, Partition: 0, Key: []byte(cfg.RelayName + "-0"), Value: nil})
	if err := res.FirstErr(); err != nil {
		t.Fatal(err)
	}
	tombstone := res[0].Record.Offset
	db.Insert(t, topic, 2, nil)

	reg := prometheus.NewRegistry()
	active := testenv.StartRelay(t, db, cfg, relay.WithRegisterer(reg))
	faultsEventually(t, 30*time.Second, "outbox_relay_shard_stopped{shard=\"0\"} is 1", func() bool {
		return faultsMetric(t, reg, "outbox_relay_shard_stopped", "shard", "0") == 1
	})
	if got := faultsMetric(t, reg, "outbox_relay_owned_shards"); got != 1 {
		t.Errorf("owned_shards = %v, want 1: the stopped shard stays with this instance", got)
	}
	var (
		stoppedAt *time.Time
		reason    *string
		owner     string
	)
	faultsEventually(t, 10*time.Second, "the owner row records the stop", func() bool {
		if err := db.Pool.QueryRow(ctx, `SELECT stopped_at, stopped_reason, owner FROM outbox_owner WHERE shard = 0`).Scan(&stoppedAt, &reason, &owner); err != nil {
			t.Fatalf("read outbox_owner: %v", err)
		}
		return stoppedAt != nil
	})
	if reason == nil || !containsAll(*reason, []string{"not a checkpoint", cfg.CheckpointTopic, "offset " + itoa(tombstone), "OUTBOX_CHECKPOINT_TOPIC"}) {
		t.Errorf("stopped_reason = %v, want the error naming the topic, the offset and the way out", reason)
	}

	// A standby neither takes the shard nor loops on it.
	standbyReg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithRegisterer(standbyReg))
	time.Sleep(3 * time.Second)
	if got := faultsMetric(t, standbyReg, "outbox_relay_recoveries_total"); got != 0 {
		t.Errorf("the standby ran %v recoveries of the stopped shard: want none (the active instance keeps it)", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_recoveries_total"); got != 1 {
		t.Errorf("recoveries_total = %v on the active instance, want 1: it stops, it does not loop", got)
	}

	// The operator's way out here: the foreign record removed (the start
	// offset moved past it), then the active instance restarted. The
	// standby takes the shard, runs it, and clears the record.
	if k.Real {
		return // kfake only below: DeleteRecords on a compacted topic
	}
	adm := k.Admin(t)
	offs := kadm.Offsets{}
	offs.Add(kadm.Offset{Topic: cfg.CheckpointTopic, Partition: 0, At: tombstone + 1})
	del, err := adm.DeleteRecords(ctx, offs)
	if err != nil || del.Error() != nil {
		t.Skipf("DeleteRecords on the checkpoint topic: %v %v", err, del.Error())
	}
	if err := active.Stop(); err != nil {
		t.Fatal(err)
	}
	faultsEventually(t, 30*time.Second, "the standby publishes the rows", func() bool { return db.Unpublished(t) == 0 })
	if err := db.Pool.QueryRow(ctx, `SELECT stopped_at, stopped_reason FROM outbox_owner WHERE shard = 0`).Scan(&stoppedAt, &reason); err != nil {
		t.Fatal(err)
	}
	if stoppedAt != nil || reason != nil {
		t.Errorf("after the shard runs again, stopped_at = %v, stopped_reason = %v: want both NULL", stoppedAt, reason)
	}
	if got := faultsMetric(t, standbyReg, "outbox_relay_shard_stopped", "shard", "0"); got != 0 {
		t.Errorf("shard_stopped on the new owner = %v, want 0", got)
	}
}
