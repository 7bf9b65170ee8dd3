package integration

// Fault and crash suite: every test names the guarantee it proves and breaks
// one window of the exactly-once protocol of DESIGN.md (crash between commit
// and mark, crash before commit, lost EndTxn answer, lost produce
// acknowledgement, leader moves, a zombie relay), then checks with a
// read_committed consumer that every row arrived exactly once.
//
// They run against the in-process kfake cluster, or a real cluster when
// KAFKA_BROKERS is set; only the sub-part that needs kfake's own controls
// (moving partition leaders) is skipped then.

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/faultproxy"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
)

// errSimulatedCrash is what the crash failpoints return.
var errSimulatedCrash = errors.New("simulated crash")

var faultsKeys = []string{"acct-1", "acct-2", "acct-3", "acct-4", "acct-5"}

// TestCrashAfterCommitBeforeMark: the relay dies after its transaction
// committed and before it marked the rows. The rows are visible to
// read_committed consumers but unmarked; the next relay marks them from the
// checkpoint (I2) instead of publishing them again.
func TestCrashAfterCommitBeforeMark(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 40, faultsKeys)
	cfg := testenv.RelayConfig(db, k)

	var crashed atomic.Bool
	var crashedIDs []int64
	crashAfterCommit := func(_ context.Context, name string, _ int32, batch []int64) error {
		if name == relay.FailAfterCommit && crashed.CompareAndSwap(false, true) {
			crashedIDs = append([]int64(nil), batch...)
			return errSimulatedCrash
		}
		return nil
	}
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crashAfterCommit))
	if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
	}
	if len(crashedIDs) != len(ids) {
		t.Fatalf("the crashed batch held %d rows, want all %d (one batch)", len(crashedIDs), len(ids))
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("after the crash %d rows are unmarked, want %d: nothing may be marked before the crash point", n, len(ids))
	}
	// Committed in Kafka already, before any recovery ran.
	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))

	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	faultsEventually(t, 30*time.Second, "the second relay marks the committed rows", func() bool { return db.Unpublished(t) == 0 })
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != float64(len(ids)) {
		t.Errorf("outbox_relay_recovered_rows_total = %v, want %d", got, len(ids))
	}
	// The line follows the mark by a moment (recovery then compares the
	// checkpoint with the table).
	faultsEventually(t, 10*time.Second, fmt.Sprintf("a log line saying recovery marked %d rows", len(ids)), func() bool {
		return strings.Contains(logs.String(), fmt.Sprintf(`"marked":%d`, len(ids)))
	})
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != 0 {
		t.Errorf("the second relay published %v records of the committed batch again", got)
	}

	more := db.Insert(t, topic, 25, faultsKeys)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, c.WaitFor(t, len(all), 30*time.Second))
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
}

// TestCrashBeforeCommit: the relay dies with its transaction open (records
// and checkpoint produced, no EndTxn). The next relay's InitProducerID
// fences the dead producer and aborts its transaction at once, not after the
// transaction timeout, and publishes each row once; read_committed consumers
// never see the aborted copy.
func TestCrashBeforeCommit(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 40, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	// Far longer than the test waits below: only fencing can end the open
	// transaction in time.
	cfg.TransactionTimeout = 2 * time.Minute

	var crashed atomic.Bool
	crashBeforeCommit := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name == relay.FailBeforeCommit && crashed.CompareAndSwap(false, true) {
			return errSimulatedCrash
		}
		return nil
	}
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crashBeforeCommit))
	if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("after the crash %d rows are unmarked, want %d", n, len(ids))
	}
	// The open transaction's records are in the log.
	uncommitted := faultsReadUncommitted(t, k.Brokers, topic, len(ids), 15*time.Second)
	if len(uncommitted) != len(ids) {
		t.Fatalf("read_uncommitted sees %d records of the open transaction, want %d", len(uncommitted), len(ids))
	}

	reg := prometheus.NewRegistry()
	start := time.Now()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	c := k.NewConsumer(t, topic)
	seen := c.WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	if d := time.Since(start); d > time.Minute {
		t.Fatalf("the open transaction ended only after %v: the new producer did not fence it", d)
	}
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != 0 {
		t.Errorf("recovery marked %v rows of a transaction that never committed", got)
	}
	// The log holds both copies: the aborted one and the committed one.
	if all := faultsReadUncommitted(t, k.Brokers, topic, 2*len(ids), 15*time.Second); len(all) != 2*len(ids) {
		t.Errorf("read_uncommitted sees %d records, want %d (aborted copy + committed copy)", len(all), 2*len(ids))
	}

	more := db.Insert(t, topic, 25, faultsKeys)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, c.WaitFor(t, len(all), 30*time.Second))
}

// TestCommitOutcomeUnknown: the broker commits but every answer to EndTxn is
// lost, so Publish cannot know the outcome (txn.ErrCommitUnknown). The relay
// must neither mark nor publish again: it recovers, and the checkpoint says
// the batch committed, so recovery marks it.
func TestCommitOutcomeUnknown(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	proxy, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)

	// At the first lost answer the broker has applied EndTxn and the relay
	// has seen nothing: check, directly against the cluster, that the
	// batch is committed and still unmarked.
	var (
		dropMu            sync.Mutex
		dropped           bool
		dropErrCode       int16 = -1
		committedAtDrop   int
		unmarkedAtDrop    = -1
		dropVerifyProblem error
	)
	proxy.DropResponses(kmsg.EndTxn.Int16(), 1000, func(d faultproxy.Drop) {
		dropMu.Lock()
		defer dropMu.Unlock()
		if dropped {
			return
		}
		dropped = true
		if r, ok := d.Response.(*kmsg.EndTxnResponse); ok {
			dropErrCode = r.ErrorCode
		}
		seen, err := faultsReadCommitted(k.Brokers, topic, len(ids), 10*time.Second)
		committedAtDrop = len(seen)
		if err != nil {
			dropVerifyProblem = err
		}
		if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE published_at IS NULL`).Scan(&unmarkedAtDrop); err != nil {
			dropVerifyProblem = err
		}
	})

	cfg := testenv.RelayConfig(db, k)
	cfg.KafkaBrokers = proxy.Addrs()
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg),
		// Few retries, so the lost answers outlast kgo's own retrying
		// (one lost answer is retried and answered success by the broker).
		relay.WithKafkaOptions(kgo.RequestRetries(2), kgo.RetryTimeout(5*time.Second)))

	commitUnknown := func() float64 {
		return faultsMetric(t, reg, "outbox_relay_transaction_aborts_total", "reason", "commit_unknown")
	}
	faultsEventually(t, 45*time.Second, "a commit_unknown abort", func() bool { return commitUnknown() >= 1 })
	proxy.ClearFaults()
	fired := proxy.Fired(kmsg.EndTxn.Int16())
	t.Logf("EndTxn answers dropped: %d", fired)

	dropMu.Lock()
	verifyProblem, errCode, committed, unmarked := dropVerifyProblem, dropErrCode, committedAtDrop, unmarkedAtDrop
	dropMu.Unlock()
	if verifyProblem != nil {
		t.Fatalf("checking the broker at the lost answer: %v", verifyProblem)
	}
	if errCode != 0 {
		t.Fatalf("the dropped EndTxn answer had error code %d, want 0: the broker did not commit", errCode)
	}
	if committed != len(ids) {
		t.Fatalf("when the EndTxn answer was lost, read_committed saw %d records, want %d", committed, len(ids))
	}
	if unmarked != len(ids) {
		t.Fatalf("when the EndTxn answer was lost, %d rows were unmarked, want %d", unmarked, len(ids))
	}

	faultsEventually(t, 30*time.Second, "recovery marks the committed batch", func() bool { return db.Unpublished(t) == 0 })
	if got := faultsMetric(t, reg, "outbox_relay_recoveries_total"); got < 2 {
		t.Errorf("outbox_relay_recoveries_total = %v, want >= 2 (start, and after the unknown outcome)", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != float64(len(ids)) {
		t.Errorf("outbox_relay_recovered_rows_total = %v, want %d", got, len(ids))
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != 0 {
		t.Errorf("published_records_total = %v after the unknown commit, want 0 (nothing published twice)", got)
	}

	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))
	more := db.Insert(t, topic, 20, faultsKeys)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, c.WaitFor(t, len(all), 30*time.Second))
	if got := commitUnknown(); got != 1 {
		t.Errorf("commit_unknown aborts = %v, want exactly 1", got)
	}
}

// TestLostProduceAckNoDuplicate: produce answers are lost after the broker
// wrote the records; the idempotent producer sends them again inside the
// same transaction and the broker drops the duplicates by sequence number.
func TestLostProduceAckNoDuplicate(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)

	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	proxy, err := faultproxy.New(ctx, testenv.Logger(t, nil), k.Brokers...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(proxy.Close)

	cfg := testenv.RelayConfig(db, k)
	cfg.KafkaBrokers = proxy.Addrs()
	cfg.BatchSize = 20
	// A dropped answer the client notices only by its request timeout
	// (10 s here) must be retried inside the transaction: the relay's
	// budget for a transaction (nine tenths of transaction.timeout.ms, 9 s
	// with testenv's 10 s) would end it first and abort the batch (seen
	// once in CI).
	cfg.TransactionTimeout = 30 * time.Second
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	c := k.NewConsumer(t, topic)

	var all []int64
	for round := range 3 {
		proxy.DropResponses(kmsg.Produce.Int16(), 2, nil)
		all = append(all, db.Insert(t, topic, 30, faultsKeys)...)
		seen := c.WaitFor(t, len(all), 30*time.Second)
		testenv.CheckExactlyOnce(t, all, seen)
		t.Logf("round %d: produce answers dropped so far: %d", round, proxy.Fired(kmsg.Produce.Int16()))
	}
	if proxy.Fired(kmsg.Produce.Int16()) == 0 {
		t.Fatal("no produce answer was dropped: the fault never fired")
	}
	if got := faultsMetric(t, reg, "outbox_relay_transaction_aborts_total"); got != 0 {
		t.Errorf("%v batches aborted: lost produce answers should be retried inside the transaction", got)
	}
	// Not even the log holds a second copy: the broker dropped the resent
	// batches by their sequence numbers.
	if n := len(faultsReadUncommitted(t, k.Brokers, topic, len(all), 15*time.Second)); n != len(all) {
		t.Errorf("read_uncommitted sees %d records for %d rows: a resent batch was written twice", n, len(all))
	}
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
}

// TestLeaderMovesDuringBatches: partition leaders of the data topic and the
// checkpoint topic move again and again while rows arrive and while a
// relay crashed between commit and mark recovers from its checkpoint. No
// row is lost or published twice.
func TestLeaderMovesDuringBatches(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = 15

	// The first relay crashes after the commit of its 8th batch, so that
	// a second one recovers from the checkpoint while leaders move.
	var batches atomic.Int32
	crash := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name == relay.FailAfterCommit && batches.Add(1) == 8 {
			return errSimulatedCrash
		}
		return nil
	}
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	faultsEventually(t, 30*time.Second, "the relay is ready", first.Relay.Ready)

	// Rows keep arriving for the whole test.
	type inserted struct {
		ids []int64
		err error
	}
	stopInsert := make(chan struct{})
	insertDone := make(chan inserted, 1)
	go func() {
		var out inserted
		defer func() { insertDone <- out }()
		for i := 0; ; i++ {
			select {
			case <-stopInsert:
				return
			case <-time.After(15 * time.Millisecond):
			}
			ids, err := faultsInsert(db, topic, 7, i)
			out.ids = append(out.ids, ids...)
			if err != nil {
				out.err = err
				return
			}
		}
	}()

	var moves, checkpointMoves atomic.Int32
	stopMoves := make(chan struct{})
	movesDone := make(chan struct{})
	t.Run("leaders move", func(t *testing.T) {
		if k.Cluster == nil {
			close(movesDone)
			t.Skip("moving partition leaders needs kfake (ShufflePartitionLeaders, MoveTopicPartition); against KAFKA_BROKERS only the crash and continuous inserts run")
		}
		go func() {
			defer close(movesDone)
			for i := int32(0); ; i++ {
				select {
				case <-stopMoves:
					return
				case <-time.After(40 * time.Millisecond):
				}
				k.Cluster.ShufflePartitionLeaders()
				for p := range int32(3) {
					if k.Cluster.MoveTopicPartition(topic, p, (i+p)%3) == nil {
						moves.Add(1)
					}
				}
				if k.Cluster.MoveTopicPartition(cfg.CheckpointTopic, 0, (i+1)%3) == nil {
					checkpointMoves.Add(1)
				}
			}
		}()
	})

	if err := first.Wait(t, 60*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
	}
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	faultsEventually(t, 30*time.Second, "recovery marks the crashed batch", func() bool {
		return faultsMetric(t, reg, "outbox_relay_recoveries_total") >= 1 && faultsMetric(t, reg, "outbox_relay_recovered_rows_total") > 0
	})
	time.Sleep(1500 * time.Millisecond) // more batches under moving leaders
	close(stopInsert)
	res := <-insertDone
	close(stopMoves)
	<-movesDone
	if res.err != nil {
		t.Fatalf("insert: %v", res.err)
	}
	if k.Cluster != nil && (moves.Load() == 0 || checkpointMoves.Load() == 0) {
		t.Fatalf("leaders did not move (data topic %d, checkpoint topic %d)", moves.Load(), checkpointMoves.Load())
	}
	t.Logf("%d rows, %d data-partition moves, %d checkpoint-partition moves, %d batches before the crash",
		len(res.ids), moves.Load(), checkpointMoves.Load(), batches.Load())

	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, res.ids, c.WaitFor(t, len(res.ids), 45*time.Second))
	faultsEventually(t, 15*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
}

// TestTwoRelaysOnOneShardOlderIsFenced: relay A is inside a batch (records
// produced, EndTxn not sent) when it loses shard ownership in Postgres.
// Relay B takes the shard, and its InitProducerID fences A in Kafka. When A
// goes on, its commit fails as fenced: A stops writing the shard, says so,
// and nothing of its batch becomes visible; B has published every row once.
func TestTwoRelaysOnOneShardOlderIsFenced(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)

	// A has its own pool, named, so that its ownership connection can be
	// found and cut.
	const appA = "relay_a_fenced_test"
	u, err := url.Parse(db.URL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	q.Set("application_name", appA)
	u.RawQuery = q.Encode()
	poolA, err := pgxpool.New(context.Background(), u.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(poolA.Close)
	dbA := &testenv.DB{URL: u.String(), Pool: poolA, Table: db.Table}

	cfgA := testenv.RelayConfig(db, k)
	cfgA.DatabaseURL = dbA.URL
	// Far longer than the test waits: only B's fencing can end A's
	// transaction in time for B's records to become visible.
	cfgA.TransactionTimeout = 2 * time.Minute
	cfgB := cfgA
	cfgB.DatabaseURL = db.URL

	held := make(chan []int64, 1)
	release := make(chan struct{})
	var releaseOnce sync.Once
	unblockA := func() { releaseOnce.Do(func() { close(release) }) }
	var holdOnce atomic.Bool
	holdBeforeCommit := func(_ context.Context, name string, _ int32, batch []int64) error {
		if name == relay.FailBeforeCommit && holdOnce.CompareAndSwap(false, true) {
			held <- append([]int64(nil), batch...)
			<-release
		}
		return nil
	}
	regA := prometheus.NewRegistry()
	logsA := &testenv.SyncBuffer{}
	testenv.StartRelay(t, dbA, cfgA, relay.WithLogger(testenv.Logger(t, logsA)), relay.WithRegisterer(regA),
		relay.WithFailpoint(holdBeforeCommit))
	t.Cleanup(unblockA) // runs before A is stopped

	select {
	case batch := <-held:
		if len(batch) != len(ids) {
			t.Fatalf("A holds a batch of %d rows, want %d", len(batch), len(ids))
		}
	case <-time.After(30 * time.Second):
		t.Fatal("relay A never reached the commit")
	}

	// A loses its ownership connection, and with it the shard lock.
	var killed int
	err = db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM (
  SELECT pg_terminate_backend(pid) FROM (
    SELECT DISTINCT l.pid FROM pg_locks l JOIN pg_stat_activity s ON s.pid = l.pid
    WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2 AND l.classid::bigint = $1
      AND s.application_name = $2 AND s.datname = current_database()) owners) t`,
		int64(migrations.LockKey+3), appA).Scan(&killed)
	if err != nil {
		t.Fatal(err)
	}
	if killed != 1 {
		t.Fatalf("terminated %d ownership connections of A, want 1", killed)
	}

	regB := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfgB, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(regB))
	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))
	faultsEventually(t, 10*time.Second, "B marks the rows", func() bool { return db.Unpublished(t) == 0 })

	// A goes on with the commit of the batch B has already published.
	unblockA()
	faultsEventually(t, 20*time.Second, "A counts the fencing", func() bool {
		return faultsMetric(t, regA, "outbox_relay_fenced_total") == 1
	})
	if !faultsLogHas(logsA.String(), `"level":"ERROR"`, "fenced") {
		t.Error("A logged no error saying it was fenced")
	}
	if got := faultsMetric(t, regA, "outbox_relay_published_records_total"); got != 0 {
		t.Errorf("A published %v records after it was fenced", got)
	}

	// B keeps the shard and A stays out of it.
	more := db.Insert(t, topic, 20, faultsKeys)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, c.WaitFor(t, len(all), 30*time.Second))
	if got := faultsMetric(t, regA, "outbox_relay_owned_shards"); got != 0 {
		t.Errorf("A owns %v shards after being fenced, want 0", got)
	}
	if got := faultsMetric(t, regA, "outbox_relay_published_records_total"); got != 0 {
		t.Errorf("A published %v records", got)
	}
	// A's batch is in the log, aborted: read_uncommitted sees it as well.
	if n := len(faultsReadUncommitted(t, k.Brokers, topic, len(all)+len(ids), 15*time.Second)); n != len(all)+len(ids) {
		t.Errorf("read_uncommitted sees %d records, want %d (A's aborted batch + B's)", n, len(all)+len(ids))
	}
}

// TestCheckpointOfAnotherTableRefusesToStart: a checkpoint written for
// another outbox table (another incarnation) is never applied: the relay
// stops with an error naming OUTBOX_CHECKPOINT_TOPIC and marks nothing.
func TestCheckpointOfAnotherTableRefusesToStart(t *testing.T) {
	db1 := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db1.Insert(t, topic, 10, faultsKeys)
	cfg1 := testenv.RelayConfig(db1, k)
	r1 := testenv.StartRelay(t, db1, cfg1)
	faultsEventually(t, 30*time.Second, "the first table is published", func() bool { return db1.Unpublished(t) == 0 })
	if err := r1.Stop(); err != nil {
		t.Fatal(err)
	}

	// A new table whose ids overlap the checkpoint's.
	db2 := testenv.NewDB(t)
	ids2 := db2.Insert(t, topic, 10, faultsKeys)
	if ids2[0] != ids[0] {
		t.Fatalf("the second table's ids start at %d, want %d (overlapping the checkpoint)", ids2[0], ids[0])
	}
	cfg2 := testenv.RelayConfig(db2, k)
	cfg2.RelayName, cfg2.CheckpointTopic = cfg1.RelayName, cfg1.CheckpointTopic
	r2 := testenv.StartRelay(t, db2, cfg2, relay.WithLogger(testenv.Logger(t, nil)))
	err := r2.Wait(t, 30*time.Second)
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_CHECKPOINT_TOPIC") {
		t.Fatalf("relay on a table with a foreign checkpoint: Run returned %v, want an error naming OUTBOX_CHECKPOINT_TOPIC", err)
	}
	if n := db2.Unpublished(t); n != len(ids2) {
		t.Fatalf("%d of %d rows of the second table were marked from the foreign checkpoint", len(ids2)-n, len(ids2))
	}
}

// faultsMetric sums the values of the counters or gauges called name whose
// labels include the given name, value pairs.
func faultsMetric(t testing.TB, reg *prometheus.Registry, name string, labels ...string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for i := 0; i+1 < len(labels); i += 2 {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == labels[i] && lp.GetValue() == labels[i+1] {
						found = true
					}
				}
				if !found {
					continue metrics
				}
			}
			sum += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	return sum
}

// faultsLogHas reports whether one line of logs contains every part.
func faultsLogHas(logs string, parts ...string) bool {
lines:
	for _, line := range strings.Split(logs, "\n") {
		for _, p := range parts {
			if !strings.Contains(line, p) {
				continue lines
			}
		}
		return true
	}
	return false
}

// faultsEventually polls cond until it holds, or fails the test naming what
// did not happen.
func faultsEventually(t testing.TB, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for: %s", timeout, what)
		}
		time.Sleep(25 * time.Millisecond)
	}
}

// faultsInsert writes n rows in one transaction and returns their ids; it
// is safe to call from any goroutine.
func faultsInsert(db *testenv.DB, topic string, n, round int) ([]int64, error) {
	ctx := context.Background()
	rows, err := db.Pool.Query(ctx, `INSERT INTO outbox (topic, key, value)
SELECT $1, convert_to('acct-' || (g % 5), 'UTF8'), convert_to('r' || $2::int || '-' || g, 'UTF8')
FROM generate_series(1, $3::int) g ORDER BY g RETURNING id`, topic, round, n)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			return ids, err
		}
		ids = append(ids, id)
	}
	return ids, rows.Err()
}

// faultsReadCommitted reads topic from the start with read_committed until
// it has want records or timeout passes; safe from any goroutine.
func faultsReadCommitted(brokers []string, topic string, want int, timeout time.Duration) ([]*kgo.Record, error) {
	return faultsRead(brokers, topic, kgo.ReadCommitted(), want, timeout)
}

// faultsReadUncommitted reads topic from the start with read_uncommitted
// (aborted and open transactions included) until it has want records or
// timeout passes, then a little longer to catch more.
func faultsReadUncommitted(t testing.TB, brokers []string, topic string, want int, timeout time.Duration) []*kgo.Record {
	t.Helper()
	recs, err := faultsRead(brokers, topic, kgo.ReadUncommitted(), want, timeout)
	if err != nil {
		t.Fatal(err)
	}
	return recs
}

func faultsRead(brokers []string, topic string, level kgo.IsolationLevel, want int, timeout time.Duration) ([]*kgo.Record, error) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(level),
		kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		return nil, err
	}
	defer cl.Close()
	var recs []*kgo.Record
	deadline := time.Now().Add(timeout)
	extra := false
	for {
		if len(recs) >= want {
			if extra {
				return recs, nil
			}
			extra = true // one more short poll, to catch records beyond want
			deadline = time.Now().Add(500 * time.Millisecond)
		}
		if time.Now().After(deadline) {
			return recs, nil
		}
		ctx, cancel := context.WithDeadline(context.Background(), deadline)
		fs := cl.PollFetches(ctx)
		cancel()
		fs.EachRecord(func(r *kgo.Record) {
			if r.Topic == topic {
				recs = append(recs, r)
			}
		})
	}
}
