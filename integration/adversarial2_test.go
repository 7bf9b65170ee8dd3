package integration

import (
	"context"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/verify"
)

// keyIDs returns the outbox ids of key's records, in the order Kafka has
// them.
func keyIDs(seen []testenv.Seen, key string) []int64 {
	var ids []int64
	for _, s := range seen {
		if string(s.Key) == key {
			ids = append(ids, s.ID)
		}
	}
	return ids
}

// TestDiscardDuringTheReadAheadPublishesTheReleasedKeyInIDOrder is the
// ledger's hold-key promise with the pipelined loop at full speed: a poison
// row of key "held" is dead-lettered and the later rows of "held" are held
// while a backlog of other keys drains in full batches, so the loop reads
// above the floor (the last id of the batch whose mark is in flight). The
// operator then runs `dlq discard` (here: the same Store.Discard, while the
// relay runs). The rows of "held" it releases lie both below the floor
// (skipped while held) and above it: every one must reach Kafka, in id
// order. The same with `dlq requeue` after the fix: the requeued row, at its
// original id below the floor, first. The discard is made at a fixed point of the loop (right after a
// read-ahead is taken), so the run is the same every time; a serial loop is
// the control.
func TestDiscardDuringTheReadAheadPublishesTheReleasedKeyInIDOrder(t *testing.T) {
	for _, tc := range []struct {
		name            string
		serial, requeue bool
	}{
		{"pipelined-discard", false, false},
		{"pipelined-requeue", false, true},
		{"serial-discard", true, false},
		{"serial-requeue", true, true},
	} {
		serial := tc.serial
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic := testenv.RandomName("ledger-")
			k := testenv.NewKafka(t, 3, topic)
			const batch = 10
			var poison int64
			if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, 'held', 'debit 100', '{"n": 5}') RETURNING id`, topic).Scan(&poison); err != nil {
				t.Fatal(err)
			}
			ids := db.Insert(t, topic, 12*batch, []string{"held", "a", "b", "c", "d"})
			st := outbox.NewStore(db.Pool, db.Table)

			release := func(ctx context.Context) {
				if !tc.requeue {
					got, err := st.Discard(ctx, []int64{poison}, "given up by the operator")
					if err != nil || !slices.Equal(got, []int64{poison}) {
						t.Errorf("discard: %v %v", got, err)
					}
					return
				}
				// Fixed, then `dlq requeue`: back at its original id.
				if _, err := db.Pool.Exec(ctx, `UPDATE outbox_dead_letter SET headers = '{"n": "5"}' WHERE id = $1`, poison); err != nil {
					t.Error(err)
				}
				got, err := st.Requeue(ctx, []int64{poison})
				if err != nil || !slices.Equal(got, []int64{poison}) {
					t.Errorf("requeue: %v %v", got, err)
				}
			}
			var once sync.Once
			discard := func(ctx context.Context, name string, _ int32, b []int64) error {
				// Half-way through the backlog: rows of "held" below and
				// above the floor.
				if name == relay.FailAfterReadAhead && len(b) > 0 && b[0] > ids[4*batch] {
					once.Do(func() { release(ctx) })
				}
				return nil
			}
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = batch
			opts := []relay.Option{relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(discard)}
			if serial {
				// The serial loop takes no read-ahead: discard once the
				// first half of the backlog is marked instead.
				opts = opts[:1]
				half := len(ids) / 2
				go func() {
					for db.Unpublished(t) > half {
						time.Sleep(5 * time.Millisecond)
					}
					once.Do(func() { release(context.Background()) })
				}()
				opts = append(opts, relay.WithSerialLoop())
			}
			testenv.StartRelay(t, db, cfg, opts...)

			all := ids
			if tc.requeue {
				all = append([]int64{poison}, ids...)
			}
			seen := k.NewConsumer(t, topic).WaitFor(t, len(all), 30*time.Second)
			var want []int64
			if tc.requeue {
				want = append(want, poison)
			}
			for i, id := range ids {
				if i%5 == 0 {
					want = append(want, id)
				}
			}
			if got := keyIDs(seen, "held"); !slices.Equal(got, want) {
				t.Fatalf("key \"held\" reached Kafka as %v,\nwant %v (id order: the rows the discard released below the read-ahead's floor must not be overtaken by the later ones)", got, want)
			}
			testenv.CheckExactlyOnce(t, all, seen)
		})
	}
}

// TestRowCommittedLateIsNotOvertakenByItsKey: an application serialises the
// writes of one account (it locks the account row), so the account's events
// commit in id order. Transaction A takes id 1 for account "acct" and
// commits late, after the pipelined loop's floor has passed id 1; the next
// write of "acct" (transaction B, which waited for A's lock) commits after
// A. Kafka must have A's event before B's, as the serial loop has them: a
// read above the floor does not see A's row, and must not publish B's
// before it.
func TestRowCommittedLateIsNotOvertakenByItsKey(t *testing.T) {
	for _, serial := range []bool{false, true} {
		name := "pipelined"
		if serial {
			name = "serial"
		}
		t.Run(name, func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic := testenv.RandomName("ledger-")
			k := testenv.NewKafka(t, 3, topic)
			const batch = 10

			txA, err := db.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer txA.Rollback(ctx) //nolint:errcheck
			var a int64
			if err := txA.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, 'acct', 'A: debit 100') RETURNING id`, topic).Scan(&a); err != nil {
				t.Fatal(err)
			}
			ids := db.Insert(t, topic, 10*batch, []string{"a", "b", "c", "d"})

			var (
				once sync.Once
				b    int64
			)
			commitLate := func() {
				if err := txA.Commit(ctx); err != nil {
					t.Errorf("commit A: %v", err)
					return
				}
				if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, 'acct', 'B: credit 100') RETURNING id`, topic).Scan(&b); err != nil {
					t.Errorf("insert B: %v", err)
				}
			}
			hook := func(_ context.Context, name string, _ int32, got []int64) error {
				if name == relay.FailAfterReadAhead && len(got) > 0 && got[0] > ids[3*batch] {
					once.Do(commitLate)
				}
				return nil
			}
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = batch
			opts := []relay.Option{relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(hook)}
			if serial {
				opts = append(opts[:1], relay.WithSerialLoop())
				after := len(ids) - 3*batch
				go func() {
					for db.Unpublished(t) > after {
						time.Sleep(5 * time.Millisecond)
					}
					once.Do(commitLate)
				}()
			}
			testenv.StartRelay(t, db, cfg, opts...)

			seen := k.NewConsumer(t, topic).WaitFor(t, len(ids)+2, 30*time.Second)
			if got := keyIDs(seen, "acct"); !slices.Equal(got, []int64{a, b}) {
				t.Fatalf("account \"acct\" reached Kafka as %v, want A %d then B %d: B committed after A", got, a, b)
			}
			testenv.CheckExactlyOnce(t, append([]int64{a, b}, ids...), seen)
		})
	}
}

// TestDeleteModeVerifyFindsARecordOfAnIDNeverIssued: in delete mode verify
// takes a record whose row is gone for a row published and deleted. A
// record whose outbox-id is above every id the table's sequence ever
// handed out (another database or table publishing into the same topic
// under the same header, a staging relay pointed at production Kafka) is no
// such row: verify must report it as a phantom and not count it as deleted,
// or the report is CLEAN while the topic holds an event no row of the ledger
// ever was.
func TestDeleteModeVerifyFindsARecordOfAnIDNeverIssued(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 20, faultsKeys)
	run := testenv.StartRelay(t, db, deleteModeConfig(db, k))
	faultsEventually(t, 30*time.Second, "every row published and deleted", func() bool { return tableRows(t, db) == 0 })
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}

	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	forged := ids[len(ids)-1] + 1000
	if err := cl.ProduceSync(ctx, &kgo.Record{Key: []byte("acct-1"), Value: []byte("debit 1000000"),
		Headers: []kgo.RecordHeader{{Key: "outbox-id", Value: []byte(strconv.FormatInt(forged, 10))}}}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	rep, err := verify.Run(ctx, verify.Config{Pool: db.Pool, Table: db.Table, Brokers: k.Brokers, Since: time.Hour, OnPublish: outbox.Delete, Topics: []string{topic}})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, f := range rep.Findings {
		found = found || f.Kind == verify.Phantom && f.ID == forged
	}
	if rep.Clean() || !found || rep.Deleted != len(ids) {
		t.Fatalf("verify in delete mode with a record of id %d, above every id the table issued: clean %v, deleted %d (want %d), findings %v; want a phantom naming it",
			forged, rep.Clean(), rep.Deleted, len(ids), rep.Findings)
	}
}
