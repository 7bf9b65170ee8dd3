package integration

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestCrashAfterNextCommitBeforePreviousMark: with the pipelined loop, the
// relay dies after batch 2's transaction committed and before batch 1's
// mark (which runs while batch 2 is published) took place. Two committed
// batches are unmarked; batch 2's checkpoint lists both (I2), so the next
// relay marks them all and publishes neither again; a read_committed
// consumer sees every row exactly once and every row ends marked.
func TestCrashAfterNextCommitBeforePreviousMark(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	const batch = 10
	ids := db.Insert(t, topic, 3*batch, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = batch

	var (
		mu        sync.Mutex
		crashed   bool
		committed [][]int64 // batches committed by the first relay, in order
	)
	crash := func(_ context.Context, name string, _ int32, b []int64) error {
		mu.Lock()
		defer mu.Unlock()
		switch {
		case name == relay.FailAfterCommit:
			committed = append(committed, slices.Clone(b))
		case name == relay.FailBeforeMarkPrevious && !crashed:
			crashed = true
			return errSimulatedCrash
		}
		return nil
	}
	first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
	if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
		t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
	}
	mu.Lock()
	if len(committed) != 2 || !slices.Equal(committed[0], ids[:batch]) || !slices.Equal(committed[1], ids[batch:2*batch]) {
		t.Fatalf("the first relay committed batches %v, want the first two batches of %d rows: batch 2 commits while batch 1's mark is pending", committed, batch)
	}
	mu.Unlock()
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("after the crash %d rows are unmarked, want %d: neither committed batch may be marked", n, len(ids))
	}
	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, ids[:2*batch], c.WaitFor(t, 2*batch, 30*time.Second))

	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))
	faultsEventually(t, 30*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != 2*batch {
		t.Errorf("outbox_relay_recovered_rows_total = %v, want %d: both committed batches marked by recovery", got, 2*batch)
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != batch {
		t.Errorf("the second relay published %v records, want only the %d of the batch never sent", got, batch)
	}
}

// TestReadAheadBegunBeforeADeadLetterPublishesNoHeldRow: the pipelined loop
// reads batch 2 while batch 1's transaction runs. Kafka refuses one record
// of batch 1 inside the transaction (MESSAGE_TOO_LARGE): the batch is split,
// the record's row is dead-lettered, and under hold-key the later rows of
// its key are held. Batch 2 was read before that dead letter existed, so it
// holds rows of the key that must not be published (I4): the read-ahead is
// dropped and batch 2 read again, with the hold in force. A read_committed
// consumer sees every row but the dead letter and the rows it holds.
func TestReadAheadBegunBeforeADeadLetterPublishesNoHeldRow(t *testing.T) {
	modesNeedControl(t, "MESSAGE_TOO_LARGE on Produce")
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	const batch = 10
	ids := db.Insert(t, topic, 3*batch, faultsKeys) // keys acct-1..acct-5 in turn
	bad := ids[2]                                   // acct-3, in batch 1
	var want, held []int64
	for i, id := range ids {
		switch {
		case id == bad:
		case faultsKeys[i%len(faultsKeys)] == faultsKeys[2] && id > bad:
			held = append(held, id)
		default:
			want = append(want, id)
		}
	}
	modesInject(t, k, kmsg.Produce, -1, modesProduceFailingRecord(bad, kerr.MessageTooLarge))
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = batch
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))

	st := outbox.NewStore(db.Pool, db.Table)
	faultsEventually(t, 30*time.Second, "the culprit is dead-lettered and every row not held is marked", func() bool {
		dead, err := st.ListDeadLetters(context.Background(), 10)
		return err == nil && len(dead) == 1 && dead[0].ID == bad && db.Unpublished(t) == len(held)
	})
	seen := k.NewConsumer(t, topic).WaitFor(t, len(want), 30*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	db.CheckPayloads(t, seen)
	waitHeld(t, st, 1, int64(len(held)), 1)
}

// TestCrashAtEveryPointOfThePipeline stops the relay once at each point of
// the pipelined loop, on the second time it gets there, with batches in
// every stage: batch n+1 read while batch n's transaction ran, batch n's
// mark running while batch n+1's transaction runs. Whatever was committed
// and not marked is in the newest checkpoint's window (I2), what was read
// and not committed is still unpublished; the next relay publishes every row
// exactly once (read_committed) and marks every row.
func TestCrashAtEveryPointOfThePipeline(t *testing.T) {
	for _, point := range []string{relay.FailBeforeCommit, relay.FailAfterCommit, relay.FailAfterReadAhead,
		relay.FailBeforeMarkPrevious, relay.FailAfterMark} {
		t.Run(point, func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			const batch = 10
			ids := db.Insert(t, topic, 6*batch, faultsKeys)
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = batch
			var (
				mu    sync.Mutex
				times int
			)
			crash := func(_ context.Context, name string, _ int32, _ []int64) error {
				mu.Lock()
				defer mu.Unlock()
				if name != point {
					return nil
				}
				if times++; times == 2 {
					return errSimulatedCrash
				}
				return nil
			}
			first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
			if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
				t.Fatalf("first relay: Run returned %v, want the simulated crash at %s", err, point)
			}
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			c := k.NewConsumer(t, topic)
			testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))
			faultsEventually(t, 30*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
		})
	}
}
