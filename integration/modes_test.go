package integration

// Delivery modes: one test per OUTBOX_DELIVERY, each crashing the relay at
// the window that matters for that mode and asserting exactly what the
// README's table promises: at-least-once duplicates only the acknowledged,
// unmarked batch (same outbox-id, key and value) and loses nothing;
// at-most-once loses only the marked, unsent batch and reports it (ERROR log
// with the ids, outbox_relay_at_most_once_lost_rows_total); exactly-once is
// what an unset OUTBOX_DELIVERY gets.
//
// They run against the in-process kfake cluster, or a real cluster when
// KAFKA_BROKERS is set: nothing here needs kfake's own controls.

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// TestAtLeastOnceCrashAfterAckDuplicatesOnlyTheUnmarkedBatch: in
// at-least-once mode the relay dies after Kafka acknowledged its 3rd batch
// and before it marked the rows. The next relay sends that batch again: the
// duplicates are exactly that batch's rows, each copy with the same outbox-id
// header, key and value, and every other row arrives exactly once. There is
// no transaction, so read_committed and read_uncommitted see the same.
func TestAtLeastOnceCrashAfterAckDuplicatesOnlyTheUnmarkedBatch(t *testing.T) {
	db, k, topic, cfg, ids, dup := modesCrashThirdBatch(t, txn.AtLeastOnce, relay.FailAfterCommit)
	if n := db.Unpublished(t); n != 2*modesBatchSize {
		t.Fatalf("after the crash %d rows are unmarked, want %d (the acknowledged 3rd batch and the unread 4th)", n, 2*modesBatchSize)
	}

	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	// Counted after the mark: once counted, every row is marked.
	faultsEventually(t, 30*time.Second, "the second relay publishes the unmarked batch again, and the 4th", func() bool {
		return faultsMetric(t, reg, "outbox_relay_published_records_total") >= 2*modesBatchSize
	})
	if n := db.Unpublished(t); n != 0 {
		t.Errorf("%d rows unmarked after the second relay published", n)
	}

	rows := modesRows(t, db)
	want := len(ids) + len(dup)
	committed := k.NewConsumer(t, topic).WaitFor(t, want, 30*time.Second)
	modesCheckDuplicates(t, "read_committed", ids, dup, rows, committed)
	uncommitted := modesRead(t, k.Brokers, topic, kgo.ReadUncommitted(), want, 15*time.Second)
	modesCheckDuplicates(t, "read_uncommitted", ids, dup, rows, uncommitted)
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != 2*modesBatchSize {
		t.Errorf("the second relay published %v records, want %d (the unmarked batch again, and the 4th)", got, 2*modesBatchSize)
	}
}

// TestAtMostOnceCrashAfterMarkLosesOnlyThatBatchAndReportsIt: in
// at-most-once mode the relay dies after it marked its 3rd batch published
// and before it sent it. That batch is lost, and only that batch: the next
// relay reports it (an ERROR line listing the ids and
// outbox_relay_at_most_once_lost_rows_total) and sends every other row, none
// twice.
func TestAtMostOnceCrashAfterMarkLosesOnlyThatBatchAndReportsIt(t *testing.T) {
	ctx := context.Background()
	db, k, topic, cfg, ids, lost := modesCrashThirdBatch(t, txn.AtMostOnce, relay.FailAfterMark)
	// Marked before producing, and recorded as in flight in the same
	// transaction.
	if n := db.Unpublished(t); n != modesBatchSize {
		t.Fatalf("after the crash %d rows are unmarked, want %d (only the unread 4th batch)", n, modesBatchSize)
	}
	var inflight []int64
	if err := db.Pool.QueryRow(ctx, `SELECT ids FROM outbox_inflight WHERE shard = 0`).Scan(&inflight); err != nil || !slices.Equal(inflight, lost) {
		t.Fatalf("in-flight record of shard 0 = %v (%v), want the marked, unsent batch %v", inflight, err, lost)
	}

	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	// Counted after the send and the in-flight record's removal.
	faultsEventually(t, 30*time.Second, "the second relay sends the 4th batch", func() bool {
		return faultsMetric(t, reg, "outbox_relay_published_records_total") >= modesBatchSize
	})
	if n := db.Unpublished(t); n != 0 {
		t.Errorf("%d rows unmarked after the second relay sent the 4th batch", n)
	}
	if got := faultsMetric(t, reg, "outbox_relay_at_most_once_lost_rows_total"); got != modesBatchSize {
		t.Errorf("outbox_relay_at_most_once_lost_rows_total = %v, want %d", got, modesBatchSize)
	}
	idList, _ := json.Marshal(lost)
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "at-most-once", `"ids":`+string(idList)) {
		t.Errorf("no ERROR line reports the lost ids %s", idList)
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != modesBatchSize {
		t.Errorf("the second relay published %v records, want %d (the 4th batch only)", got, modesBatchSize)
	}
	var left int
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox_inflight`).Scan(&left); err != nil || left != 0 {
		t.Errorf("%d in-flight records left after the report (%v), want 0: the loss would be reported again", left, err)
	}

	// Every row but the lost batch, each once; the lost batch never, not
	// even uncommitted.
	var delivered []int64
	for _, id := range ids {
		if !slices.Contains(lost, id) {
			delivered = append(delivered, id)
		}
	}
	testenv.CheckExactlyOnce(t, delivered, k.NewConsumer(t, topic).WaitFor(t, len(delivered), 30*time.Second))
	testenv.CheckExactlyOnce(t, delivered, modesRead(t, k.Brokers, topic, kgo.ReadUncommitted(), len(delivered), 15*time.Second))
}

// TestExactlyOnceModeIsTheDefault: a relay whose Delivery is empty runs
// exactly-once: a transactional producer with the shard's transactional id,
// the before-commit point of a transaction reached, and a checkpoint record
// listing the batch's ids committed with it.
func TestExactlyOnceModeIsTheDefault(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = ""

	var beforeCommit atomic.Int32
	countCommits := func(_ context.Context, name string, _ int32, _ []int64) error {
		if name == relay.FailBeforeCommit {
			beforeCommit.Add(1)
		}
		return nil
	}
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithFailpoint(countCommits))
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })

	if beforeCommit.Load() == 0 {
		t.Error("no transaction reached its commit: the relay did not publish transactionally")
	}
	txnID := cfg.RelayName + "-0"
	if !faultsLogHas(logs.String(), `"msg":"relay started"`, `"delivery":"exactly-once"`) {
		t.Error(`no "relay started" line with "delivery":"exactly-once"`)
	}
	if !faultsLogHas(logs.String(), "producer initialized", `"transactional_id":"`+txnID+`"`) {
		t.Errorf("no line says the producer initialized with transactional id %s", txnID)
	}
	cps, err := faultsReadCommitted(k.Brokers, cfg.CheckpointTopic, 1, 15*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	var listed []int64
	seen := map[int64]bool{}
	for _, r := range cps {
		var cp txn.Checkpoint
		if err := json.Unmarshal(r.Value, &cp); err != nil {
			t.Fatalf("checkpoint record %q: %v", r.Value, err)
		}
		if string(r.Key) != txnID || cp.Shard != 0 || cp.Relay != cfg.RelayName {
			t.Errorf("checkpoint record key %q shard %d relay %q, want %q, 0, %q", r.Key, cp.Shard, cp.Relay, txnID, cfg.RelayName)
		}
		w, err := cp.RecoveryWindow(1000, 0)
		if err != nil {
			t.Fatalf("checkpoint record %q: %v", r.Value, err)
		}
		for _, row := range w.Rows() {
			if !seen[row.ID] {
				seen[row.ID] = true
				listed = append(listed, row.ID)
			}
		}
	}
	slices.Sort(listed)
	if !slices.Equal(listed, ids) {
		t.Fatalf("committed checkpoints list ids %v, want every published id %v", listed, ids)
	}
}

// modesRow is an outbox row as the database holds it.
type modesRow struct{ key, value []byte }

// modesRows reads every row of the outbox table by id.
func modesRows(t *testing.T, db *testenv.DB) map[int64]modesRow {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), `SELECT id, key, value FROM outbox`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	out := map[int64]modesRow{}
	for rows.Next() {
		var id int64
		var r modesRow
		if err := rows.Scan(&id, &r.key, &r.value); err != nil {
			t.Fatal(err)
		}
		out[id] = r
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

// modesCheckDuplicates fails the test unless seen holds every id of want,
// the ids of dup exactly twice and every other id exactly once, nothing
// else; every record carries its row's key and value and a matching
// outbox-id header; and a consumer that drops repeated outbox-ids sees each
// row once, in id order per key.
func modesCheckDuplicates(t *testing.T, who string, want, dup []int64, rows map[int64]modesRow, seen []testenv.Seen) {
	t.Helper()
	count := map[int64]int{}
	var first []testenv.Seen
	for _, s := range seen {
		row, ok := rows[s.ID]
		if !ok {
			t.Fatalf("%s: record with outbox-id %q is no outbox row", who, s.Headers[txn.HeaderOutboxID])
		}
		if s.Headers[txn.HeaderOutboxID] != strconv.FormatInt(s.ID, 10) || !bytes.Equal(s.Key, row.key) || !bytes.Equal(s.Value, row.value) {
			t.Fatalf("%s: copy %d of row %d has outbox-id %q, key %q, value %q; the row has key %q, value %q",
				who, count[s.ID]+1, s.ID, s.Headers[txn.HeaderOutboxID], s.Key, s.Value, row.key, row.value)
		}
		if count[s.ID] == 0 {
			first = append(first, s)
		}
		count[s.ID]++
	}
	var wrong []string
	for _, id := range want {
		expect := 1
		if slices.Contains(dup, id) {
			expect = 2
		}
		if count[id] != expect {
			wrong = append(wrong, fmt.Sprintf("%d seen %d times, want %d", id, count[id], expect))
		}
	}
	if len(wrong) > 0 || len(seen) != len(want)+len(dup) {
		t.Fatalf("%s: %d records for %d rows and %d duplicates: %s", who, len(seen), len(want), len(dup), strings.Join(wrong, "; "))
	}
	testenv.CheckExactlyOnce(t, want, first)
}

// modesRead reads topic from the start at the given isolation level until
// it has want records or timeout passes (then a little longer, to catch
// more).
func modesRead(t *testing.T, brokers []string, topic string, level kgo.IsolationLevel, want int, timeout time.Duration) []testenv.Seen {
	t.Helper()
	recs, err := faultsRead(brokers, topic, level, want, timeout)
	if err != nil {
		t.Fatal(err)
	}
	seen := make([]testenv.Seen, 0, len(recs))
	for _, r := range recs {
		s := testenv.Seen{ID: -1, Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Key: r.Key, Value: r.Value, Headers: map[string]string{}}
		for _, h := range r.Headers {
			s.Headers[h.Key] = string(h.Value)
			if h.Key == txn.HeaderOutboxID {
				s.ID, _ = strconv.ParseInt(string(h.Value), 10, 64)
			}
		}
		seen = append(seen, s)
	}
	return seen
}

// modesCrashAt returns a failpoint that crashes the relay the nth time it
// passes point, and a function that returns the ids of that batch.
func modesCrashAt(point string, n int32) (relay.Failpoint, func() []int64) {
	var (
		passed  atomic.Int32
		mu      sync.Mutex
		crashed []int64
	)
	fp := func(_ context.Context, name string, _ int32, batch []int64) error {
		if name == point && passed.Add(1) == n {
			mu.Lock()
			crashed = append([]int64(nil), batch...)
			mu.Unlock()
			return errSimulatedCrash
		}
		return nil
	}
	return fp, func() []int64 {
		mu.Lock()
		defer mu.Unlock()
		return crashed
	}
}

// modesBatchSize is the batch size of the mode crash tests.
const modesBatchSize = 25

// modesCrashThirdBatch writes four batches of rows, runs a relay in mode
// that crashes at point in its third batch, and returns the set-up, all ids
// and the crashed batch's ids (checked to be the third batch).
func modesCrashThirdBatch(t *testing.T, mode txn.Mode, point string) (*testenv.DB, *testenv.Kafka, string, relay.Config, []int64, []int64) {
	t.Helper()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 4*modesBatchSize, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = string(mode)
	cfg.BatchSize = modesBatchSize

	fp, crashedBatch := modesCrashAt(point, 3)
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(fp))
	if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
	}
	crashed := crashedBatch()
	if want := ids[2*modesBatchSize : 3*modesBatchSize]; !slices.Equal(crashed, want) {
		t.Fatalf("the crashed batch is %v, want the 3rd batch %v", crashed, want)
	}
	return db, k, topic, cfg, ids, crashed
}
