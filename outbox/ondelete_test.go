package outbox_test

import (
	"context"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// remaining returns the ids left in the outbox table and, of them, those
// marked published.
func remaining(t *testing.T, db *testenv.DB) (ids, published []int64) {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), `SELECT id, published_at IS NOT NULL FROM outbox ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var id int64
	var pub bool
	if _, err := pgx.ForEachRow(rows, []any{&id, &pub}, func() error {
		ids = append(ids, id)
		if pub {
			published = append(published, id)
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return ids, published
}

// createdAt returns the created_at of the given rows, in their order.
func createdAt(t *testing.T, db *testenv.DB, ids []int64) []time.Time {
	t.Helper()
	out := make([]time.Time, len(ids))
	for i, id := range ids {
		if err := db.Pool.QueryRow(context.Background(), `SELECT created_at FROM outbox WHERE id = $1`, id).Scan(&out[i]); err != nil {
			t.Fatal(err)
		}
	}
	return out
}

func TestParseOnPublish(t *testing.T) {
	for in, want := range map[string]outbox.OnPublish{"": outbox.Mark, "mark": outbox.Mark, "delete": outbox.Delete} {
		if got, err := outbox.ParseOnPublish(in); err != nil || got != want {
			t.Errorf("ParseOnPublish(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := outbox.ParseOnPublish("remove"); err == nil || !strings.Contains(err.Error(), "mark") || !strings.Contains(err.Error(), "delete") {
		t.Errorf("ParseOnPublish(remove): %v; want an error naming mark and delete", err)
	}
	if got := outbox.NewStore(nil, outbox.DefaultTable).OnPublish(); got != outbox.Mark {
		t.Errorf("a new store settles rows by %q, want mark", got)
	}
}

// TestDeleteModeDeletesOnlyTheRowsTheCheckpointProves: under Delete,
// MarkCommitted deletes a row only when its id AND created_at match (I5): a
// row that reuses a recorded id with another created_at stays, to be
// published. Applying it again deletes nothing (idempotent: deleted rows
// match nothing). MarkCommittedBefore (format-1 checkpoints) deletes only
// rows created no later than the checkpoint. No delete touches a row a relay
// in mark mode marked published.
func TestDeleteModeDeletesOnlyTheRowsTheCheckpointProves(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 8, nil)
	st := outbox.NewStore(db.Pool, db.Table).WithOnPublish(outbox.Delete)
	if st.OnPublish() != outbox.Delete {
		t.Fatalf("WithOnPublish(Delete) gave a store that settles by %q", st.OnPublish())
	}
	l := takeLease(t, db, st, "test")
	marker := outbox.NewStore(db.Pool, db.Table) // a relay of the table in mark mode
	if n, err := marker.MarkPublished(ctx, l, ids[7:]); err != nil || n != 1 {
		t.Fatalf("mark-mode MarkPublished: %d, %v", n, err)
	}

	created := createdAt(t, db, ids[:4])
	created[3] = created[3].Add(time.Microsecond) // ids[3] is "another row reusing the id"
	n, err := st.MarkCommitted(ctx, l, ids[:4], created)
	if err != nil || n != 3 {
		t.Fatalf("MarkCommitted in delete mode: %d, %v; want 3 rows deleted", n, err)
	}
	if n, err := st.MarkCommitted(ctx, l, ids[:4], created); err != nil || n != 0 {
		t.Fatalf("MarkCommitted again: %d, %v; want 0 (idempotent)", n, err)
	}
	left, published := remaining(t, db)
	if !slices.Equal(left, ids[3:]) || !slices.Equal(published, ids[7:]) {
		t.Fatalf("after MarkCommitted the table holds %v (published %v), want %v (published %v): the row whose created_at differs must stay unpublished",
			left, published, ids[3:], ids[7:])
	}

	// Format 1: ids only; a row created after the checkpoint was written
	// is not one it recorded.
	if n, err := st.MarkCommittedBefore(ctx, l, ids[3:5], createdAt(t, db, ids[3:4])[0].Add(-time.Second)); err != nil || n != 0 {
		t.Fatalf("MarkCommittedBefore, written before the rows: %d, %v; want 0", n, err)
	}
	if n, err := st.MarkCommittedBefore(ctx, l, ids[3:5], time.Now().Add(time.Hour)); err != nil || n != 2 {
		t.Fatalf("MarkCommittedBefore, written after the rows: %d, %v; want 2", n, err)
	}
	// At-least-once's mark, and the row marked by the mark-mode relay.
	if n, err := st.MarkPublished(ctx, l, ids[5:]); err != nil || n != 2 {
		t.Fatalf("MarkPublished in delete mode: %d, %v; want 2 (not the row marked in mark mode)", n, err)
	}
	if left, published := remaining(t, db); !slices.Equal(left, ids[7:]) || !slices.Equal(published, ids[7:]) {
		t.Fatalf("the table holds %v (published %v), want only the row marked in mark mode %v", left, published, ids[7:])
	}
}

// TestDeleteModeMarkInflightSendsOnlyWhatItDeleted: at-most-once under
// Delete deletes the rows and records them in flight in one statement, and
// returns only the rows it deleted, so two relays that both believe they own
// the shard never send a row twice; recovery finds the unconfirmed batch.
func TestDeleteModeMarkInflightSendsOnlyWhatItDeleted(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 4, nil)
	st := outbox.NewStore(db.Pool, db.Table).WithOnPublish(outbox.Delete)
	l := takeLease(t, db, st, "test")
	first, batch, err := st.MarkInflight(ctx, l, ids[:3])
	if err != nil || !slices.Equal(first, ids[:3]) {
		t.Fatalf("first delete: %v, %v; want %v", first, err, ids[:3])
	}
	if err := st.ConfirmInflight(ctx, l, batch); err != nil {
		t.Fatal(err)
	}
	second, _, err := st.MarkInflight(ctx, l, ids)
	if err != nil || !slices.Equal(second, ids[3:]) {
		t.Fatalf("second delete: %v, %v; want only %v", second, err, ids[3:])
	}
	if left, _ := remaining(t, db); len(left) != 0 {
		t.Fatalf("rows %v left in the table, want none", left)
	}
	if inflight, err := st.TakeInflight(ctx, l); err != nil || !slices.Equal(inflight, ids[3:]) {
		t.Fatalf("in-flight record: %v, %v; want %v", inflight, err, ids[3:])
	}
}

// TestDeleteModeALostLeaseDeletesNothing: once another relay took the shard,
// every delete of the old owner deletes nothing and says ErrLeaseLost.
func TestDeleteModeALostLeaseDeletesNothing(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	ids := db.Insert(t, "t", 4, nil)
	st := outbox.NewStore(db.Pool, db.Table).WithOnPublish(outbox.Delete)
	old := takeLease(t, db, st, "old owner")
	l := takeLease(t, db, st, "new owner")
	created := createdAt(t, db, ids)
	if n, err := st.MarkPublished(ctx, old, ids); !errors.Is(err, outbox.ErrLeaseLost) || n != 0 {
		t.Errorf("MarkPublished under a lost lease: %d, %v; want 0, ErrLeaseLost", n, err)
	}
	if n, err := st.MarkCommitted(ctx, old, ids, created); !errors.Is(err, outbox.ErrLeaseLost) || n != 0 {
		t.Errorf("MarkCommitted under a lost lease: %d, %v; want 0, ErrLeaseLost", n, err)
	}
	if n, err := st.MarkCommittedBefore(ctx, old, ids, time.Now().Add(time.Hour)); !errors.Is(err, outbox.ErrLeaseLost) || n != 0 {
		t.Errorf("MarkCommittedBefore under a lost lease: %d, %v; want 0, ErrLeaseLost", n, err)
	}
	if m, _, err := st.MarkInflight(ctx, old, ids); !errors.Is(err, outbox.ErrLeaseLost) || len(m) != 0 {
		t.Errorf("MarkInflight under a lost lease: %v, %v; want nothing, ErrLeaseLost", m, err)
	}
	if left, _ := remaining(t, db); !slices.Equal(left, ids) {
		t.Fatalf("the table holds %v after the old owner's deletes, want every row %v", left, ids)
	}
	if n, err := st.MarkCommitted(ctx, l, ids, created); err != nil || n != int64(len(ids)) {
		t.Errorf("MarkCommitted under the current lease: %d, %v; want %d", n, err, len(ids))
	}
}
