package outbox_test

import (
	"context"
	"slices"
	"testing"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestMarkInflightReturnsOnlyWhatItMarked: when two relays believe they own
// a shard in at-most-once mode, only the one whose mark changed a row sends
// it, so a row is never sent twice.
func TestMarkInflightReturnsOnlyWhatItMarked(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 4, nil)
	st := outbox.NewStore(db.Pool, db.Table)
	first, batch, err := st.MarkInflight(ctx, 0, ids[:3])
	if err != nil || !slices.Equal(first, ids[:3]) {
		t.Fatalf("first mark: %v, %v; want %v", first, err, ids[:3])
	}
	if err := st.ConfirmInflight(ctx, batch); err != nil {
		t.Fatal(err)
	}
	second, _, err := st.MarkInflight(ctx, 0, ids)
	if err != nil || !slices.Equal(second, ids[3:]) {
		t.Fatalf("second mark: %v, %v; want only %v", second, err, ids[3:])
	}
	inflight, err := st.TakeInflight(ctx, 0)
	if err != nil || !slices.Equal(inflight, ids[3:]) {
		t.Fatalf("in-flight record: %v, %v; want %v", inflight, err, ids[3:])
	}
	if again, err := st.TakeInflight(ctx, 0); err != nil || len(again) != 0 {
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
	if _, _, err := st.MarkInflight(ctx, 0, ids[:3]); err != nil { // the old owner, which then dies
		t.Fatal(err)
	}
	_, batch, err := st.MarkInflight(ctx, 0, ids[3:]) // the new owner
	if err != nil {
		t.Fatal(err)
	}
	if err := st.ConfirmInflight(ctx, batch); err != nil { // the new owner confirms its send
		t.Fatal(err)
	}
	lost, err := st.TakeInflight(ctx, 0) // the next recovery
	if err != nil || !slices.Equal(lost, ids[:3]) {
		t.Fatalf("after the new owner confirmed its batch, recovery finds %v (%v) in flight, want the old owner's unsent batch %v", lost, err, ids[:3])
	}
}
