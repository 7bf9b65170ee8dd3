package integration

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// ledgerRows writes a ledger's rows for keys a and b with a poison row (its
// headers are not string to string) in the middle of key a's sequence, and
// a keyless row, in one transaction:
//
//	1 a open, 2 b open, 3 a debit (poison), 4 a debit, 5 b debit,
//	6 keyless, 7 a credit, 8 b credit
//
// It returns the poison row's id.
func ledgerRows(t *testing.T, db *testenv.DB) int64 {
	t.Helper()
	if _, err := db.Pool.Exec(context.Background(), `INSERT INTO outbox (topic, key, value, headers) VALUES
    ('ledger', 'a', 'open', NULL), ('ledger', 'b', 'open', NULL), ('ledger', 'a', 'debit 100', '{"n": 5}'),
    ('ledger', 'a', 'debit 7', NULL), ('ledger', 'b', 'debit 5', NULL), ('ledger', NULL, 'audit', NULL),
    ('ledger', 'a', 'credit 50', NULL), ('ledger', 'b', 'credit 5', NULL)`); err != nil {
		t.Fatal(err)
	}
	return 3
}

// seenIDs returns the outbox ids of seen, sorted.
func seenIDs(seen []testenv.Seen) []int64 {
	ids := make([]int64, len(seen))
	for i, s := range seen {
		ids[i] = s.ID
	}
	slices.Sort(ids)
	return ids
}

// TestDeadLetterHoldsTheLaterRowsOfItsKey is the ledger's guarantee under
// OUTBOX_DEAD_LETTER_ORDER=hold-key (the default), in every delivery mode
// and with two shards: a poison row in the middle of key a's sequence is
// dead-lettered, the later rows of key a are held (not published, also
// after a restart of the relay), key b and keyless rows flow on; after the
// fix, `dlq requeue` puts the row back in its original position and key a's
// records reach Kafka in id order, every row once.
func TestDeadLetterHoldsTheLaterRowsOfItsKey(t *testing.T) {
	for _, tc := range []struct {
		name     string
		delivery string
		shards   int
	}{
		{"exactly-once", "exactly-once", 1},
		{"at-least-once", "at-least-once", 1},
		{"at-most-once", "at-most-once", 1},
		{"two-shards", "exactly-once", 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := testenv.NewDB(t)
			k := testenv.NewKafka(t, 2, "ledger")
			poison := ledgerRows(t, db)
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = tc.delivery
			cfg.Shards = tc.shards
			reg := prometheus.NewRegistry()
			run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))

			c := k.NewConsumer(t, "ledger")
			seen := c.WaitFor(t, 5, 30*time.Second)
			if got, want := seenIDs(seen), []int64{1, 2, 5, 6, 8}; !slices.Equal(got, want) {
				t.Fatalf("published ids %v, want %v: key a's rows after its dead letter %d must be held, the others published", got, want, poison)
			}
			st := outbox.NewStore(db.Pool, db.Table)
			waitHeld(t, st, tc.shards, 2, 1)
			waitGauge(t, reg, "outbox_relay_held_rows", 2)
			waitGauge(t, reg, "outbox_relay_held_keys", 1)
			dead, err := st.ListDeadLetters(context.Background(), 10)
			if err != nil || len(dead) != 1 || dead[0].ID != poison || dead[0].Holds != 2 {
				t.Fatalf("dlq list: %+v %v, want dead letter %d holding 2 rows", dead, err, poison)
			}

			// A restart of the relay while rows are held holds them still:
			// the read itself skips them.
			if err := run.Stop(); err != nil {
				t.Fatal(err)
			}
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			time.Sleep(time.Second)
			if got := seenIDs(c.WaitFor(t, 6, time.Second)); !slices.Equal(got, []int64{1, 2, 5, 6, 8}) {
				t.Fatalf("after a restart, published ids %v: the held rows of key a were published", got)
			}

			// Fixed and requeued in its original position, the dead letter
			// goes out before the rows it held, in id order.
			if _, err := db.Pool.Exec(context.Background(), `UPDATE outbox_dead_letter SET headers = '{"n": "5"}' WHERE id = $1`, poison); err != nil {
				t.Fatal(err)
			}
			ids, err := st.Requeue(context.Background(), []int64{poison})
			if err != nil || !slices.Equal(ids, []int64{poison}) {
				t.Fatalf("requeue: %v %v, want the original id %d", ids, err, poison)
			}
			seen = c.WaitFor(t, 8, 30*time.Second)
			testenv.CheckExactlyOnce(t, []int64{1, 2, 3, 4, 5, 6, 7, 8}, seen)
			var keyA []int64
			for _, r := range seen {
				if string(r.Key) == "a" {
					keyA = append(keyA, r.ID)
				}
			}
			if !slices.Equal(keyA, []int64{1, 3, 4, 7}) {
				t.Fatalf("key a reached Kafka as %v, want 1 3 4 7", keyA)
			}
			waitHeld(t, st, tc.shards, 0, 0)
		})
	}
}

// waitHeld waits until the shards hold rows rows of keys keys in all.
func waitHeld(t *testing.T, st *outbox.Store, shards int, rows, keys int64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		var r, k int64
		for s := range shards {
			sr, sk, err := st.Held(context.Background(), s, shards)
			if err != nil {
				t.Fatal(err)
			}
			r, k = r+sr, k+sk
		}
		if r == rows && k == keys {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("held rows %d of %d keys, want %d of %d", r, k, rows, keys)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// waitGauge waits until the gauge (summed over shards) is want.
func waitGauge(t *testing.T, reg *prometheus.Registry, name string, want float64) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for counter(t, reg, name, nil) != want {
		if time.Now().After(deadline) {
			t.Fatalf("%s = %v, want %v", name, counter(t, reg, name, nil), want)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDeadLetterFromTheRecordErrorSplitHoldsItsKey: Kafka refuses one row
// after it was sent (MESSAGE_TOO_LARGE on its record batch, injected). In
// exactly-once the relay splits the aborted batch until the row stands
// alone; in at-least-once it sends the refused rows one by one. Either way
// the culprit is dead-lettered and the later rows of its key in the same
// batch are not published (held), while the other keys' rows are, once.
// `dlq discard` then releases the key: the held rows are published, in id
// order, and the culprit stays in the dead-letter table with its reason.
func TestDeadLetterFromTheRecordErrorSplitHoldsItsKey(t *testing.T) {
	modesNeedControl(t, "MESSAGE_TOO_LARGE on Produce")
	for _, mode := range []txn.Mode{txn.ExactlyOnce, txn.AtLeastOnce} {
		t.Run(string(mode), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			first := db.Insert(t, topic, 20, faultsKeys)
			bad := db.Insert(t, topic, 1, faultsKeys[:1])[0]
			later := db.Insert(t, topic, 19, faultsKeys)
			var want, held []int64
			want = append(want, first...)
			for i, id := range later {
				if faultsKeys[i%len(faultsKeys)] == faultsKeys[0] {
					held = append(held, id)
				} else {
					want = append(want, id)
				}
			}
			modesInject(t, k, kmsg.Produce, -1, modesProduceFailingRecord(bad, kerr.MessageTooLarge))
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = string(mode)
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))

			st := outbox.NewStore(db.Pool, db.Table)
			faultsEventually(t, 30*time.Second, "the culprit is dead-lettered and every row not held is marked", func() bool {
				dead, err := st.ListDeadLetters(ctx, 10)
				return err == nil && len(dead) == 1 && db.Unpublished(t) == len(held)
			})
			c := k.NewConsumer(t, topic)
			seen := c.WaitFor(t, len(want), 30*time.Second)
			testenv.CheckExactlyOnce(t, want, seen)
			// The halves of the split batch carry their rows' payloads:
			// nothing of a batch is let go before Kafka took all of it.
			db.CheckPayloads(t, seen)
			waitHeld(t, st, 1, int64(len(held)), 1)

			if _, err := st.Discard(ctx, []int64{bad}, ""); err == nil {
				t.Fatal("discard without a reason: no error")
			}
			done, err := st.Discard(ctx, []int64{bad}, "duplicate of a later transfer, refunded by hand")
			if err != nil || !slices.Equal(done, []int64{bad}) {
				t.Fatalf("discard: %v %v", done, err)
			}
			seen = c.WaitFor(t, len(want)+len(held), 30*time.Second)
			testenv.CheckExactlyOnce(t, append(want, held...), seen)
			dead, err := st.ListDeadLetters(ctx, 10)
			if err != nil || len(dead) != 1 || dead[0].ID != bad || dead[0].DiscardedAt == nil ||
				dead[0].DiscardReason != "duplicate of a later transfer, refunded by hand" || dead[0].Holds != 0 {
				t.Fatalf("after discard, dead letters %+v %v: want row %d kept, discarded with its reason, holding nothing", dead, err, bad)
			}
			waitHeld(t, st, 1, 0, 0)
			if ids, err := st.Requeue(ctx, []int64{bad}); err != nil || len(ids) != 0 {
				t.Fatalf("requeue of a discarded dead letter in place: %v %v, want none (its key's later rows are out)", ids, err)
			}
		})
	}
}

// TestDeadLetterOrderSkipPublishesTheLaterRowsOfItsKey: with
// OUTBOX_DEAD_LETTER_ORDER=skip, a dead letter holds nothing (the
// behaviour before hold-key): the later rows of its key are published.
func TestDeadLetterOrderSkipPublishesTheLaterRowsOfItsKey(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 2, "ledger")
	ledgerRows(t, db)
	cfg := testenv.RelayConfig(db, k)
	cfg.DeadLetterOrder = "skip"
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	seen := k.NewConsumer(t, "ledger").WaitFor(t, 7, 30*time.Second)
	testenv.CheckExactlyOnce(t, []int64{1, 2, 4, 5, 6, 7, 8}, seen)
}

// TestDeadLetterOrderIsValidated: a value other than hold-key or skip is a
// start-up error naming the variable and both values.
func TestDeadLetterOrderIsValidated(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1)
	cfg := testenv.RelayConfig(db, k)
	cfg.DeadLetterOrder = "hold"
	_, err := relay.New(cfg, db.Pool)
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_DEAD_LETTER_ORDER") || !strings.Contains(err.Error(), "hold-key") || !strings.Contains(err.Error(), "skip") {
		t.Fatalf("relay.New with OUTBOX_DEAD_LETTER_ORDER=hold: %v, want an error naming the variable and its values", err)
	}
}
