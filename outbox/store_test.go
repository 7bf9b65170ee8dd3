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
	first, err := st.MarkInflight(ctx, 0, ids[:3])
	if err != nil || !slices.Equal(first, ids[:3]) {
		t.Fatalf("first mark: %v, %v; want %v", first, err, ids[:3])
	}
	second, err := st.MarkInflight(ctx, 0, ids)
	if err != nil || !slices.Equal(second, ids[3:]) {
		t.Fatalf("second mark: %v, %v; want only %v", second, err, ids[3:])
	}
	inflight, err := st.TakeInflight(ctx, 0)
	if err != nil || !slices.Equal(inflight, ids[3:]) {
		t.Fatalf("in-flight record: %v, %v; want %v", inflight, err, ids[3:])
	}
	if again, err := st.TakeInflight(ctx, 0); err != nil || again != nil {
		t.Fatalf("in-flight record after take: %v, %v", again, err)
	}
}
