package txn

import (
	"encoding/json"
	"slices"
	"testing"
	"time"
)

func batchOf(from, n int64, at time.Time) []Committed {
	b := make([]Committed, n)
	for i := range b {
		b[i] = Committed{ID: from + int64(i)*3, Created: at.Add(time.Duration(i) * 37 * time.Microsecond)}
	}
	return b
}

// TestWindowKeepsTheLastBatchesAndRoundTrips: the window keeps the newest
// Limit batches, survives the checkpoint's JSON exactly (ids and creation
// times to the microsecond), and adding a batch leaves the old window as it
// was (a batch joins only once its transaction committed).
func TestWindowKeepsTheLastBatchesAndRoundTrips(t *testing.T) {
	at := time.Date(2026, 12, 1, 10, 0, 0, 123456000, time.UTC)
	w := Window{Limit: 3}
	var all [][]Committed
	for i := range int64(5) {
		b := batchOf(1+i*100, 50, at.Add(time.Duration(i)*time.Second))
		before := w.Rows()
		next := w.With(b)
		if !slices.Equal(w.Rows(), before) {
			t.Fatal("With changed the window it was called on")
		}
		w = next
		all = append(all, b)
	}
	if w.Batches() != 3 {
		t.Fatalf("window holds %d batches, want the limit 3", w.Batches())
	}
	want := slices.Concat(all[2:]...)
	cp := Checkpoint{Relay: "r", Shard: 0}
	cp.SetWindow(w)
	raw, err := json.Marshal(cp)
	if err != nil {
		t.Fatal(err)
	}
	var back Checkpoint
	if err := json.Unmarshal(raw, &back); err != nil {
		t.Fatal(err)
	}
	got, err := back.RecoveryWindow(3, 0)
	if err != nil {
		t.Fatal(err)
	}
	if !slices.EqualFunc(got.Rows(), want, func(a, b Committed) bool { return a.ID == b.ID && a.Created.Equal(b.Created) }) {
		t.Fatalf("decoded window differs: %d rows, want %d", len(got.Rows()), len(want))
	}
	if per := float64(len(cp.Window)) / float64(len(want)); per > 8 {
		t.Errorf("%.1f bytes a row in the checkpoint, want about 4 to 6", per)
	}
	// A smaller limit on recovery still returns every batch recorded (I9:
	// a standby with OUTBOX_RECOVERY_WINDOW=1 marks what the writer's
	// window listed); the limit applies from the next batch on.
	fewer, _ := back.RecoveryWindow(1, 0)
	if !slices.Equal(ids(fewer.Rows()), ids(want)) {
		t.Errorf("limit 1 recovers %v, want every recorded row %v", ids(fewer.Rows()), ids(want))
	}
	next := batchOf(1000, 3, time.Now())
	if after := fewer.With(next); !slices.Equal(ids(after.Rows()), ids(next)) {
		t.Errorf("limit 1 carries %v on after the next batch, want that batch only", ids(after.Rows()))
	}
}

// TestWindowDropsOldBatchesBeyondMaxBytes: the newest batch always stays,
// older ones go first when the encoded window would pass MaxBytes.
func TestWindowDropsOldBatchesBeyondMaxBytes(t *testing.T) {
	at := time.Now()
	one := len(encodeBatch(batchOf(1, 100, at)))
	w := Window{Limit: 10, MaxBytes: 2*one + one/2}
	for i := range int64(6) {
		w = w.With(batchOf(1+i*1000, 100, at))
	}
	if w.Batches() != 2 {
		t.Fatalf("window holds %d batches, want 2 within %d bytes", w.Batches(), w.MaxBytes)
	}
	tiny := Window{Limit: 10, MaxBytes: 1}.With(batchOf(1, 100, at))
	if tiny.Batches() != 1 {
		t.Fatal("the newest batch must stay even beyond MaxBytes")
	}
}

func ids(rows []Committed) []int64 {
	out := make([]int64, len(rows))
	for i, r := range rows {
		out[i] = r.ID
	}
	return out
}
