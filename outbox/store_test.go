package outbox_test

import (
	"context"
	"errors"
	"slices"
	"testing"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// takeLease takes the lease of shard 0 as a relay would after taking the
// shard's advisory lock.
func takeLease(t *testing.T, db *testenv.DB, st *outbox.Store, owner string) outbox.Lease {
	t.Helper()
	l, err := st.TakeLease(context.Background(), db.Pool, 0, owner)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// TestMarkInflightReturnsOnlyWhatItMarked: when two relays believe they own
// a shard in at-most-once mode, only the one whose mark changed a row sends
// it, so a row is never sent twice.
func TestMarkInflightReturnsOnlyWhatItMarked(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 4, nil)
	st := outbox.NewStore(db.Pool, db.Table)
	l := takeLease(t, db, st, "test")
	first, batch, err := st.MarkInflight(ctx, l, ids[:3])
	if err != nil || !slices.Equal(first, ids[:3]) {
		t.Fatalf("first mark: %v, %v; want %v", first, err, ids[:3])
	}
	if err := st.ConfirmInflight(ctx, l, batch); err != nil {
		t.Fatal(err)
	}
	second, _, err := st.MarkInflight(ctx, l, ids)
	if err != nil || !slices.Equal(second, ids[3:]) {
		t.Fatalf("second mark: %v, %v; want only %v", second, err, ids[3:])
	}
	inflight, err := st.TakeInflight(ctx, l)
	if err != nil || !slices.Equal(inflight, ids[3:]) {
		t.Fatalf("in-flight record: %v, %v; want %v", inflight, err, ids[3:])
	}
	if again, err := st.TakeInflight(ctx, l); err != nil || len(again) != 0 {
		t.Fatalf("in-flight record after take: %v, %v", again, err)
	}
}

// TestEveryUnconfirmedAtMostOnceBatchIsReported: an old owner marks batch A
// and dies before sending it; meanwhile the new owner marks and confirms its
// own batch B. The next recovery must still find A to report it lost.
func TestEveryUnconfirmedAtMostOnceBatchIsReported(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 6, nil)
	st := outbox.NewStore(db.Pool, db.Table)
	old := takeLease(t, db, st, "old owner")
	if _, _, err := st.MarkInflight(ctx, old, ids[:3]); err != nil { // the old owner, which then dies
		t.Fatal(err)
	}
	l := takeLease(t, db, st, "new owner")
	_, batch, err := st.MarkInflight(ctx, l, ids[3:]) // the new owner
	if err != nil {
		t.Fatal(err)
	}
	if err := st.ConfirmInflight(ctx, l, batch); err != nil { // the new owner confirms its send
		t.Fatal(err)
	}
	lost, err := st.TakeInflight(ctx, l) // the next recovery
	if err != nil || !slices.Equal(lost, ids[:3]) {
		t.Fatalf("after the new owner confirmed its batch, recovery finds %v (%v) in flight, want the old owner's unsent batch %v", lost, err, ids[:3])
	}
}

// TestALostLeaseChangesNoRow: once another relay took the shard (a newer
// lease token), every statement by which the old owner would change rows of
// the shard changes nothing and says ErrLeaseLost; the new owner's work.
func TestALostLeaseChangesNoRow(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 6, nil)
	st := outbox.NewStore(db.Pool, db.Table)
	old := takeLease(t, db, st, "old owner")
	_, batch, err := st.MarkInflight(ctx, old, ids[5:])
	if err != nil {
		t.Fatal(err)
	}
	l := takeLease(t, db, st, "new owner")
	if l.Token != old.Token+1 {
		t.Fatalf("the new lease has token %d, want %d", l.Token, old.Token+1)
	}

	if n, err := st.MarkPublished(ctx, old, ids[:2]); !errors.Is(err, outbox.ErrLeaseLost) || n != 0 {
		t.Errorf("MarkPublished under a lost lease: %d rows, %v; want 0, ErrLeaseLost", n, err)
	}
	if n, err := st.MoveToDeadLetter(ctx, old, []outbox.DeadLetter{{ID: ids[2], Error: "x"}}); !errors.Is(err, outbox.ErrLeaseLost) || n != 0 {
		t.Errorf("MoveToDeadLetter under a lost lease: %d rows, %v; want 0, ErrLeaseLost", n, err)
	}
	if m, _, err := st.MarkInflight(ctx, old, ids[3:4]); !errors.Is(err, outbox.ErrLeaseLost) || len(m) != 0 {
		t.Errorf("MarkInflight under a lost lease: %v, %v; want nothing, ErrLeaseLost", m, err)
	}
	if err := st.ConfirmInflight(ctx, old, batch); !errors.Is(err, outbox.ErrLeaseLost) {
		t.Errorf("ConfirmInflight under a lost lease: %v; want ErrLeaseLost", err)
	}
	if _, err := st.TakeInflight(ctx, old); !errors.Is(err, outbox.ErrLeaseLost) {
		t.Errorf("TakeInflight under a lost lease: %v; want ErrLeaseLost", err)
	}
	if n := db.Unpublished(t); n != 5 {
		t.Errorf("%d rows unpublished, want 5: the old owner changed rows after losing the lease", n)
	}
	var dead int
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox_dead_letter`).Scan(&dead); err != nil || dead != 0 {
		t.Errorf("%d dead letters (%v), want 0", dead, err)
	}

	// The new owner can do all of it.
	if n, err := st.MarkPublished(ctx, l, ids[:2]); err != nil || n != 2 {
		t.Errorf("MarkPublished under the current lease: %d, %v", n, err)
	}
	if n, err := st.MoveToDeadLetter(ctx, l, []outbox.DeadLetter{{ID: ids[2], Error: "x"}}); err != nil || n != 1 {
		t.Errorf("MoveToDeadLetter under the current lease: %d, %v", n, err)
	}
	if lost, err := st.TakeInflight(ctx, l); err != nil || !slices.Equal(lost, ids[5:]) {
		t.Errorf("TakeInflight under the current lease: %v, %v; want the old owner's batch %v", lost, err, ids[5:])
	}
	if lost, err := st.RenewLeases(ctx, db.Pool, []outbox.Lease{old}); err != nil || !slices.Equal(lost, []int32{0}) {
		t.Errorf("RenewLeases of the old lease: lost %v, %v; want shard 0", lost, err)
	}
	if lost, err := st.RenewLeases(ctx, db.Pool, []outbox.Lease{l}); err != nil || len(lost) != 0 {
		t.Errorf("RenewLeases of the current lease: lost %v, %v; want none", lost, err)
	}
}
