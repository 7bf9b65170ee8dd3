package outbox_test

import (
	"context"
	"slices"
	"strings"
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

// TestReadBatchStopsBeforeTheByteBound: a read returns rows in id order
// until the next would pass maxBytes of key, value and headers, and always
// the first row, even one larger than maxBytes by itself; with several
// shards the bound applies to the shard's own rows.
func TestReadBatchStopsBeforeTheByteBound(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	sizes := []int{100, 100, 100, 500, 100}
	for _, n := range sizes {
		if err := db.Table.Write(ctx, db.Pool, outbox.Message{Topic: "t", Value: make([]byte, n)}); err != nil {
			t.Fatal(err)
		}
	}
	// A row whose headers alone pass the bound: they count too.
	if err := db.Table.Write(ctx, db.Pool, outbox.Message{Topic: "t", Value: []byte("v"), Headers: map[string]string{"h": strings.Repeat("x", 300)}}); err != nil {
		t.Fatal(err)
	}
	st := outbox.NewStore(db.Pool, db.Table)
	ids := func(rows []outbox.Row) []int64 {
		var out []int64
		for _, r := range rows {
			out = append(out, r.ID)
		}
		return out
	}

	// Two shards: keyless rows map to shards by id, shard 1 holds 1, 3, 5.
	rows, err := st.ReadBatch(ctx, 1, 2, 10, 250)
	if err != nil || !slices.Equal(ids(rows), []int64{1, 3}) {
		t.Fatalf("shard 1 of 2, 250 bytes: %v (%v), want rows 1 and 3", ids(rows), err)
	}
	// No byte bound: the row limit alone.
	if rows, err := st.ReadBatch(ctx, 0, 1, 10, 0); err != nil || len(rows) != 6 {
		t.Fatalf("no byte bound: %v (%v), want all 6 rows", ids(rows), err)
	}
	for _, want := range [][]int64{{1, 2}, {3}, {4}, {5}, {6}} {
		rows, err := st.ReadBatch(ctx, 0, 1, 10, 250)
		if err != nil || !slices.Equal(ids(rows), want) {
			t.Fatalf("250 bytes: read %v (%v), want %v", ids(rows), err, want)
		}
		if id := rows[0].ID; id <= int64(len(sizes)) && len(rows[0].Value) != sizes[id-1] {
			t.Fatalf("row %d has a %d-byte value, want %d", id, len(rows[0].Value), sizes[id-1])
		}
		if _, err := st.MarkPublished(ctx, want); err != nil {
			t.Fatal(err)
		}
	}
	if rows, err := st.ReadBatch(ctx, 0, 1, 10, 250); err != nil || len(rows) != 0 {
		t.Fatalf("after every row was marked: %v (%v)", ids(rows), err)
	}
}
