package outbox_test

import (
	"context"
	"errors"
	"maps"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

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
	l := takeLease(t, db, st, "reader")
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
		if _, err := st.MarkPublished(ctx, l, want); err != nil {
			t.Fatal(err)
		}
	}
	if rows, err := st.ReadBatch(ctx, 0, 1, 10, 250); err != nil || len(rows) != 0 {
		t.Fatalf("after every row was marked: %v (%v)", ids(rows), err)
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

// TestReadBatchHoldsTheLaterRowsOfADeadLettersTopicAndKey: under HoldKey a
// dead letter holds the later unpublished rows of its topic and key, in
// every shard layout and with the byte bound or without; not the earlier
// rows, not the same key in another topic, not keyless rows, and not once
// discarded. Skip holds nothing.
func TestReadBatchHoldsTheLaterRowsOfADeadLettersTopicAndKey(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	// 1 t/a, 2 t/a (dead), 3 t/a, 4 u/a, 5 t/b, 6 t/-, 7 t/a
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES
    ('t', 'a', '1'), ('t', 'a', '2'), ('t', 'a', '3'), ('u', 'a', '4'), ('t', 'b', '5'), ('t', NULL, '6'), ('t', 'a', '7')`); err != nil {
		t.Fatal(err)
	}
	st := outbox.NewStore(db.Pool, db.Table)
	l := takeLease(t, db, st, "test")
	if _, err := st.MarkPublished(ctx, l, []int64{1}); err != nil {
		t.Fatal(err)
	}
	if _, err := st.MoveToDeadLetter(ctx, l, []outbox.DeadLetter{{ID: 2, Error: "refused"}}); err != nil {
		t.Fatal(err)
	}
	read := func(st *outbox.Store, maxBytes int64) []int64 {
		t.Helper()
		var ids []int64
		for shard := range 2 {
			rows, err := st.ReadBatch(ctx, shard, 2, 100, maxBytes)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range rows {
				ids = append(ids, r.ID)
			}
		}
		one, err := st.ReadBatch(ctx, 0, 1, 100, maxBytes)
		if err != nil {
			t.Fatal(err)
		}
		slices.Sort(ids)
		var oneIDs []int64
		for _, r := range one {
			oneIDs = append(oneIDs, r.ID)
		}
		if !slices.Equal(ids, oneIDs) {
			t.Fatalf("two shards read %v, one shard %v", ids, oneIDs)
		}
		return ids
	}
	for _, maxBytes := range []int64{0, 1 << 20} {
		if got := read(st, maxBytes); !slices.Equal(got, []int64{4, 5, 6}) {
			t.Fatalf("hold-key read %v (maxBytes %d), want 4 5 6: rows 3 and 7 of t/a are held", got, maxBytes)
		}
		if got := read(st.WithDeadLetterOrder(outbox.Skip), maxBytes); !slices.Equal(got, []int64{3, 4, 5, 6, 7}) {
			t.Fatalf("skip read %v, want 3 4 5 6 7", got)
		}
	}
	if rows, keys, err := st.Held(ctx, 0, 1); err != nil || rows != 2 || keys != 1 {
		t.Fatalf("held: %d rows of %d keys, %v; want 2 of 1", rows, keys, err)
	}
	if _, err := st.Discard(ctx, []int64{2}, "given up"); err != nil {
		t.Fatal(err)
	}
	if got := read(st, 1<<20); !slices.Equal(got, []int64{3, 4, 5, 6, 7}) {
		t.Fatalf("after discard, read %v, want 3 4 5 6 7", got)
	}
}

// TestReadBatchReadsLargeRowsApartWithTheirColumns: under a byte bound a row
// larger than the bound's share per row (maxBytes/limit) comes from the read
// with its size only, and its key, value and headers are read apart if it
// is kept. Every kept row must come back as written, tombstones (NULL
// values) included, cut in id order at the bound; the durable read of a
// relay returns the same.
func TestReadBatchReadsLargeRowsApartWithTheirColumns(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	big := strings.Repeat("v", 3000)
	msgs := []outbox.Message{
		{Topic: "t", Key: []byte("k1"), Value: []byte("small")},
		{Topic: "t", Key: []byte("k2"), Value: []byte(big), Headers: map[string]string{"h": "large row"}},
		{Topic: "t", Key: []byte("k3"), Value: nil},                      // a small tombstone
		{Topic: "t", Key: []byte(strings.Repeat("k", 2500)), Value: nil}, // a large tombstone
		{Topic: "t", Key: []byte("k5"), Value: []byte("x"), Headers: map[string]string{"a": "b"}},
		{Topic: "t", Key: []byte("k6"), Value: []byte(big)}, // past the bound with the rows before it
	}
	for _, m := range msgs {
		if err := db.Table.Write(ctx, db.Pool, m); err != nil {
			t.Fatal(err)
		}
	}
	st := outbox.NewStore(db.Pool, db.Table)
	l := takeLease(t, db, st, "reader")
	check := func(what string, rows []outbox.Row, err error) {
		t.Helper()
		if err != nil {
			t.Fatalf("%s: %v", what, err)
		}
		// 8,000 bytes over 6 rows: about 1,333 a row inline; rows 1-5
		// take 5+3000+13+2+2500+... bytes, row 6 would pass 8,000.
		if len(rows) != 5 {
			t.Fatalf("%s: %d rows, want the 5 before the bound", what, len(rows))
		}
		for i, row := range rows {
			m := msgs[i]
			if row.ID != int64(i+1) || string(row.Key) != string(m.Key) || (row.Value == nil) != (m.Value == nil) || string(row.Value) != string(m.Value) {
				t.Fatalf("%s: row %d is id %d key %.10q value %d bytes (nil %v), want key %.10q value %d bytes (nil %v)",
					what, i+1, row.ID, row.Key, len(row.Value), row.Value == nil, m.Key, len(m.Value), m.Value == nil)
			}
			if (m.Headers == nil) != (row.Headers == nil) || (m.Headers != nil && !strings.Contains(string(row.Headers), m.Headers[slices.Collect(maps.Keys(m.Headers))[0]])) {
				t.Fatalf("%s: row %d headers %s, want %v", what, i+1, row.Headers, m.Headers)
			}
		}
	}
	rows, err := st.ReadBatch(ctx, 0, 1, 6, 8000)
	check("ReadBatch", rows, err)
	rows, err = st.ReadDurable(ctx, l, 1, 6, 8000, nil)
	check("ReadDurable", rows, err)
	// A single row larger than the bound is read on its own.
	if rows, err := st.ReadBatch(ctx, 0, 1, 6, 100); err != nil || len(rows) != 1 || string(rows[0].Value) != "small" {
		t.Fatalf("100 bytes: %d rows (%v), want row 1 alone", len(rows), err)
	}
	if _, err := st.MarkPublished(ctx, l, []int64{1}); err != nil {
		t.Fatal(err)
	}
	if rows, err := st.ReadBatch(ctx, 0, 1, 6, 100); err != nil || len(rows) != 1 || rows[0].ID != 2 || string(rows[0].Value) != big {
		t.Fatalf("100 bytes after row 1: %d rows (%v), want row 2 alone, whole", len(rows), err)
	}
}

// TestSkippingReadHashesTheIdsInFlightInEveryPlan: the pipelined loop's
// read leaves out the ids of the batches in flight (thousands of them).
// Through pgx's statement cache the read runs as a prepared statement, which
// PostgreSQL plans generically after five runs, with the ids a parameter: the
// exclusion must then still be a hash probe per row, not a comparison with
// every id (`id <> ALL ($n)` is that: 380 ms a read of 5,000 rows past
// 10,000 ids, against 6 ms).
func TestSkippingReadHashesTheIdsInFlightInEveryPlan(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	st := outbox.NewStore(db.Pool, db.Table)
	for _, plan := range []string{"force_custom_plan", "force_generic_plan"} {
		for _, bounded := range []bool{false, true} {
			conn, err := db.Pool.Acquire(ctx)
			if err != nil {
				t.Fatal(err)
			}
			args := "1000, '{1,2,3}'"
			if bounded {
				args = "1000, 16777, '{1,2,3}'"
			}
			var plans []string
			err = func() error {
				defer conn.Release()
				if _, err := conn.Exec(ctx, `SET plan_cache_mode = `+plan); err != nil {
					return err
				}
				if _, err := conn.Exec(ctx, `PREPARE skipping AS `+st.ReadSkippingSQL(1, bounded)); err != nil {
					return err
				}
				defer conn.Exec(ctx, `DEALLOCATE skipping; RESET plan_cache_mode`) //nolint:errcheck // the connection goes back to the pool
				rows, err := conn.Query(ctx, `EXPLAIN EXECUTE skipping(`+args+`)`)
				if err != nil {
					return err
				}
				plans, err = pgx.CollectRows(rows, pgx.RowTo[string])
				return err
			}()
			if err != nil {
				t.Fatal(err)
			}
			text := strings.Join(plans, "\n")
			if !strings.Contains(text, "hashed SubPlan") {
				t.Errorf("%s, bounded %v: the ids in flight are not probed in a hash:\n%s", plan, bounded, text)
			}
		}
	}
}
