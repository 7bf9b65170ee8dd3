package inbox_test

import (
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// withEvent is rec(id, p) with an outbox-event-id header of value ev.
func withEvent(id int64, p int32, ev string) *kgo.Record {
	r := rec(id, p)
	r.Headers = append(r.Headers, kgo.RecordHeader{Key: "outbox-event-id", Value: []byte(ev)})
	return r
}

// TestEventIDIsTheDedupeKeyAndOldRecordsKeepTheirs: a record with an
// outbox-event-id is deduplicated by it, whatever its outbox-id (two
// tables, or a restored one, reuse outbox-ids; one event id is one event,
// in any case of its hex digits); a record without one (from before the
// relay's migration 7) by its outbox-id, as before; an event id that is
// not a UUID makes the record poison.
func TestEventIDIsTheDedupeKeyAndOldRecordsKeepTheirs(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2)
	p := e.producer(t)
	const (
		evA = "0b7c4c1e-3f4a-4d2b-9a55-0123456789ab"
		evB = "7e57c0de-0000-4000-8000-00000000c0ff"
	)
	p.send(t, true, rec(1, 0), rec(2, 1), rec(3, 0))                                               // old records
	p.send(t, true, rec(2, 0))                                                                     // an old duplicate
	p.send(t, true, withEvent(1, 0, evA), withEvent(1, 1, evB))                                    // new events reusing outbox-id 1
	p.send(t, true, withEvent(9, 1, evA), withEvent(1, 0, "7E57C0DE-0000-4000-8000-00000000C0FF")) // duplicates by event id
	p.send(t, true, withEvent(5, 0, "not-a-uuid"))                                                 // poison

	r := start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "5 applied, 3 duplicates, 1 dead letter", func() bool {
		st := r.in.Stats()
		return st.Applied >= 5 && st.Duplicates >= 3 && st.DeadLettered >= 1
	})
	time.Sleep(500 * time.Millisecond)
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if st := r.in.Stats(); st.Applied != 5 || st.Duplicates != 3 || st.DeadLettered != 1 {
		t.Fatalf("stats %+v: want 5 applied (3 old, 2 new events), 3 duplicates, 1 dead letter", st)
	}
	if n := e.count(t, `SELECT count(*) FROM inbox_applied WHERE event_id IS NOT NULL`); n != 2 {
		t.Errorf("%d applied rows with an event id, want 2", n)
	}
	if n := e.count(t, `SELECT count(*) FROM inbox_dead_letter WHERE outbox_id = 5 AND event_id IS NULL AND error LIKE '%outbox-event-id%'`); n != 1 {
		t.Errorf("%d dead letters for the record with an invalid event id, want 1", n)
	}
}
