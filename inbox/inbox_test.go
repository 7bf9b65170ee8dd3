package inbox_test

import (
	"context"
	"errors"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/inbox"
)

// TestEveryCommittedEventIsAppliedOnceAndAbortedOnesNever: committed
// transactions are applied once each; records of aborted transactions
// (read_committed) and second copies of an outbox-id (a relay in
// at-least-once mode) never.
func TestEveryCommittedEventIsAppliedOnceAndAbortedOnesNever(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 3)
	p := e.producer(t)
	p.sendIDs(t, 1, 150, 3)
	p.send(t, false, rec(1001, 0), rec(1002, 1), rec(1003, 2)) // aborted
	p.sendIDs(t, 151, 200, 3)
	p.send(t, true, rec(7, 1), rec(8, 2), rec(150, 0)) // second copies, at other offsets

	r := start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "200 events applied", func() bool { return r.in.Stats().Applied >= 200 })
	waitFor(t, 10*time.Second, "the 3 duplicates skipped", func() bool { return r.in.Stats().Duplicates >= 3 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	e.checkExactlyOnce(t, ids(1, 200))
	if st := r.in.Stats(); st.Applied != 200 || st.Duplicates != 3 || st.DeadLettered != 0 {
		t.Fatalf("stats %+v: want 200 applied, 3 duplicates, no dead letter", st)
	}
}

// TestResumesFromTheDatabaseNotFromKafkaGroupOffsets: Kafka's group
// offsets are only a courtesy. Rewound to 0, the inbox does not see the
// applied records again; moved to the end, it still applies what the
// database says is next. And the courtesy commit does reach Kafka.
func TestResumesFromTheDatabaseNotFromKafkaGroupOffsets(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2)
	p := e.producer(t)
	p.sendIDs(t, 1, 100, 2)
	r := start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "100 events applied", func() bool { return r.in.Stats().Applied >= 100 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	adm := e.k.Admin(t)
	ctx := context.Background()

	// The courtesy commit: Kafka's group offsets equal the stored ones.
	stored := e.storedOffsets(t)
	fetched, err := adm.FetchOffsets(ctx, e.group)
	if err != nil || fetched.Error() != nil {
		t.Fatalf("fetch group offsets: %v %v", err, fetched.Error())
	}
	for part, next := range stored {
		if o, ok := fetched.Lookup(e.topic, part); !ok || o.At != next {
			t.Errorf("partition %d: Kafka's group offset %+v, the database's %d: the courtesy commit did not happen", part, o, next)
		}
	}

	// Rewind Kafka's group offsets to 0: nothing is seen again.
	rewind := kadm.Offsets{}
	for part := range stored {
		rewind.AddOffset(e.topic, part, 0, -1)
	}
	commitGroupOffsets(t, adm, e.group, rewind)
	p.sendIDs(t, 101, 130, 2)
	r = start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "30 new events applied", func() bool { return r.in.Stats().Applied >= 30 })
	time.Sleep(300 * time.Millisecond)
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if st := r.in.Stats(); st.Redelivered != 0 || st.Duplicates != 0 || st.Applied != 30 {
		t.Fatalf("after rewinding Kafka's group offsets: %+v; want 30 applied, nothing redelivered: the inbox read Kafka's offsets", st)
	}

	// Move Kafka's group offsets to the end while new records wait: they
	// are applied all the same.
	p.sendIDs(t, 131, 160, 2)
	ends, err := adm.ListEndOffsets(ctx, e.topic)
	if err != nil {
		t.Fatal(err)
	}
	commitGroupOffsets(t, adm, e.group, ends.Offsets())
	r = start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "30 more events applied", func() bool { return r.in.Stats().Applied >= 30 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	e.checkExactlyOnce(t, ids(1, 160))
}

func commitGroupOffsets(t *testing.T, adm *kadm.Client, group string, os kadm.Offsets) {
	t.Helper()
	resp, err := adm.CommitOffsets(context.Background(), group, os)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("commit group offsets: %v", err)
	}
}

// storedOffsets is inbox_offsets.next_offset by partition for e's group.
func (e *env) storedOffsets(t *testing.T) map[int32]int64 {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT partition, next_offset FROM inbox_offsets WHERE consumer_group = $1 AND topic = $2`, e.group, e.topic)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int32]int64{}
	for rows.Next() {
		var p int32
		var n int64
		if err := rows.Scan(&p, &n); err != nil {
			t.Fatal(err)
		}
		out[p] = n
	}
	return out
}

// TestHandlerErrorsRollBackEverythingAndAreRetried: a handler that writes
// and then fails leaves no trace (its write, the applied row and the
// offset roll back together); the event is applied on a later attempt,
// once, and the events after it in its batch too.
func TestHandlerErrorsRollBackEverythingAndAreRetried(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 2)
	e.producer(t).sendIDs(t, 1, 120, 2)
	flaky := map[int64]bool{5: true, 6: true, 47: true, 100: true}
	var mu sync.Mutex
	fails := map[int64]int{}
	h := func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
		if err := record(ctx, tx, ev); err != nil {
			return err
		}
		mu.Lock()
		defer mu.Unlock()
		if flaky[ev.OutboxID] && fails[ev.OutboxID] < 2 {
			fails[ev.OutboxID]++
			return errors.New("ledger busy")
		}
		return nil
	}
	r := start(t, e, e.config(), h)
	waitFor(t, 30*time.Second, "120 events applied", func() bool { return r.in.Stats().Applied >= 120 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	e.checkExactlyOnce(t, ids(1, 120))
	for id := range flaky {
		if n := e.count(t, `SELECT attempt FROM effects WHERE outbox_id = $1`, id); n != 3 {
			t.Errorf("event %d was applied at attempt %d, want 3 (two failures rolled back)", id, n)
		}
	}
	if st := r.in.Stats(); st.HandlerErrs != 8 || st.DeadLettered != 0 {
		t.Errorf("stats %+v: want 8 handler errors, no dead letter", st)
	}
}

// TestPoisonEventsAreDeadLetteredAndThePartitionMovesOn: an event whose
// handler always fails (after MaxAttempts), one the handler refuses as
// permanent (at once), a record without an outbox-id header and one with
// a malformed id: each lands in the dead-letter table with its error, none
// leaves an effect, and the events after them are applied. Once the cause
// is fixed, Replay applies a dead letter exactly once.
func TestPoisonEventsAreDeadLetteredAndThePartitionMovesOn(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	p := e.producer(t)
	p.sendIDs(t, 1, 10, 1)
	noHeader := &kgo.Record{Value: []byte("no header")}
	badHeader := &kgo.Record{Value: []byte("bad header"), Headers: []kgo.RecordHeader{{Key: inbox.HeaderOutboxID, Value: []byte("12x")}}}
	p.send(t, true, noHeader, rec(11, 0), badHeader, rec(12, 0))
	p.sendIDs(t, 13, 30, 1)

	var (
		calls sync.Map // id → attempts seen
		fixed atomic.Bool
	)
	h := func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
		if err := record(ctx, tx, ev); err != nil {
			return err
		}
		n, _ := calls.LoadOrStore(ev.OutboxID, new(atomic.Int32))
		n.(*atomic.Int32).Add(1)
		switch {
		case fixed.Load():
		case ev.OutboxID == 11:
			return errors.New("account 11 is closed")
		case ev.OutboxID == 12:
			return inbox.Permanent(errors.New("cannot decode transfer 12"))
		}
		return nil
	}
	cfg := e.config()
	cfg.MaxAttempts = 3
	r := start(t, e, cfg, h)
	waitFor(t, 30*time.Second, "28 events applied and 4 dead letters", func() bool {
		st := r.in.Stats()
		return st.Applied >= 28 && st.DeadLettered >= 4
	})
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	want := append(ids(1, 10), ids(13, 30)...)
	e.checkExactlyOnce(t, want)

	type dl struct {
		id       int64
		outboxID *int64
		attempts int
		err      string
	}
	rows, err := e.pool.Query(context.Background(), `SELECT id, outbox_id, attempts, error FROM inbox_dead_letter ORDER BY kafka_offset`)
	if err != nil {
		t.Fatal(err)
	}
	got, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (dl, error) {
		var d dl
		return d, r.Scan(&d.id, &d.outboxID, &d.attempts, &d.err)
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 4 {
		t.Fatalf("%d dead letters, want 4: %+v", len(got), got)
	}
	checks := []struct {
		id       int64
		attempts int
		err      string
	}{{0, 0, "no valid outbox-id"}, {11, 3, "account 11 is closed"}, {0, 0, "no valid outbox-id"}, {12, 1, "cannot decode transfer 12"}}
	for n, c := range checks {
		d := got[n]
		id := int64(0)
		if d.outboxID != nil {
			id = *d.outboxID
		}
		if id != c.id || d.attempts != c.attempts || !strings.Contains(d.err, c.err) {
			t.Errorf("dead letter %d: outbox_id %d, attempts %d, error %q; want %d, %d, %q", n, id, d.attempts, d.err, c.id, c.attempts, c.err)
		}
	}
	if n, _ := calls.Load(int64(11)); n.(*atomic.Int32).Load() != 3 {
		t.Errorf("the failing event was tried %d times, want MaxAttempts = 3", n.(*atomic.Int32).Load())
	}
	if n, _ := calls.Load(int64(12)); n.(*atomic.Int32).Load() != 1 {
		t.Errorf("the permanent failure was tried %d times, want 1", n.(*atomic.Int32).Load())
	}
	ctx := context.Background()
	ends, err := e.k.Admin(t).ListEndOffsets(ctx, e.topic)
	if err != nil {
		t.Fatal(err)
	}
	end, _ := ends.Lookup(e.topic, 0)
	if next := e.storedOffsets(t)[0]; next < end.Offset-1 {
		t.Errorf("stored next offset %d, the log ends at %d: the partition did not move past the poison", next, end.Offset)
	}

	// The cause fixed: event 11 is replayed from the dead-letter table,
	// once; a second copy of event 12 arrives and is applied, so its
	// replay applies nothing; a record without an outbox-id cannot be
	// replayed exactly once.
	fixed.Store(true)
	if applied, err := r.in.Replay(ctx, got[1].id); err != nil || !applied {
		t.Fatalf("replay of event 11: applied %v, %v", applied, err)
	}
	if _, err := r.in.Replay(ctx, got[1].id); !errors.Is(err, inbox.ErrNoDeadLetter) {
		t.Fatalf("second replay of event 11: %v, want ErrNoDeadLetter", err)
	}
	p.send(t, true, rec(12, 0))
	r = start(t, e, cfg, h)
	waitFor(t, 30*time.Second, "the second copy of event 12 applied", func() bool { return r.in.Stats().Applied >= 1 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	if applied, err := r.in.Replay(ctx, got[3].id); err != nil || applied {
		t.Fatalf("replay of event 12, applied meanwhile: applied %v, %v; want false, nil", applied, err)
	}
	if _, err := r.in.Replay(ctx, got[0].id); !errors.Is(err, inbox.ErrNoDedupeKey) {
		t.Fatalf("replay of a record without outbox-id: %v, want ErrNoDedupeKey", err)
	}
	e.checkExactlyOnce(t, ids(1, 30))
	if n := e.count(t, `SELECT count(*) FROM inbox_dead_letter`); n != 2 {
		t.Fatalf("%d dead letters left, want the 2 without an outbox-id", n)
	}
}

// TestRecordsDeletedBeforeTheyWereAppliedStopTheInbox: when retention (here
// DeleteRecords) removed records the group never applied, Run stops with
// ErrRecordsDeleted and says how to go on, instead of skipping them.
func TestRecordsDeletedBeforeTheyWereAppliedStopTheInbox(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	p := e.producer(t)
	p.sendIDs(t, 1, 20, 1)
	r := start(t, e, e.config(), record)
	waitFor(t, 30*time.Second, "20 events applied", func() bool { return r.in.Stats().Applied >= 20 })
	if err := r.stop(); err != nil {
		t.Fatal(err)
	}
	p.sendIDs(t, 21, 40, 1)
	ctx := context.Background()
	adm := e.k.Admin(t)
	ends, err := adm.ListEndOffsets(ctx, e.topic)
	if err != nil {
		t.Fatal(err)
	}
	del, err := adm.DeleteRecords(ctx, ends.Offsets())
	if err == nil {
		err = del.Error()
	}
	if err != nil {
		t.Fatalf("delete records: %v", err)
	}
	r = start(t, e, e.config(), record)
	err = r.wait(t, 30*time.Second)
	if !errors.Is(err, inbox.ErrRecordsDeleted) || !strings.Contains(err.Error(), "UPDATE ") {
		t.Fatalf("Run returned %v, want ErrRecordsDeleted with the statement to accept the loss", err)
	}
	if n := r.in.Stats().Applied; n != 0 {
		t.Fatalf("%d events applied after the gap", n)
	}
}

func TestMigratorIsSeparateAndIdempotent(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	ctx := context.Background()
	m, err := inbox.NewMigrator(e.pool, "public", "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if ran, err := m.Up(ctx); err != nil || len(ran) != 0 {
		t.Fatalf("second Up: ran %d, %v; want nothing to do", len(ran), err)
	}
	if n, err := m.Pending(ctx); err != nil || n != 0 {
		t.Fatalf("Pending: %d, %v", n, err)
	}
	all, err := m.All()
	if err != nil {
		t.Fatal(err)
	}
	if e.count(t, `SELECT count(*) FROM inbox_schema_migrations`) != int64(len(all)) || e.count(t, `SELECT count(*) FROM pg_tables WHERE tablename LIKE 'outbox%'`) != 0 {
		t.Fatal("the inbox's version table is not its own, or it created outbox tables")
	}
	other, err := inbox.NewMigrator(e.pool, "ledger", "events")
	if err != nil {
		t.Fatal(err)
	}
	sql, err := other.SQL()
	if err != nil || !strings.Contains(sql, `"ledger"."events_offsets"`) || strings.Contains(sql, `"inbox`) || strings.Contains(sql, `"public"`) {
		t.Fatalf("SQL for ledger.events:\n%s\n%v", sql, err)
	}
	if _, err := other.Up(ctx); err != nil {
		t.Fatal(err)
	}
	// Tables created by another tool from Migrator.SQL count as current.
	viaTool, err := inbox.NewMigrator(e.pool, "public", "bytool")
	if err != nil {
		t.Fatal(err)
	}
	ddl, err := viaTool.SQL()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.pool.Exec(ctx, ddl); err != nil {
		t.Fatalf("apply Migrator.SQL as another tool would: %v", err)
	}
	if n, err := viaTool.Pending(ctx); err != nil || n != 0 {
		t.Fatalf("Pending after another tool applied the SQL: %d, %v; want 0", n, err)
	}
	cfg := e.config()
	cfg.Schema, cfg.Table = "ledger", "missing"
	in, err := inbox.New(cfg, e.pool, record)
	if err != nil {
		t.Fatal(err)
	}
	if err := in.Run(ctx); err == nil || !strings.Contains(err.Error(), "pending") {
		t.Fatalf("Run without migrated tables: %v, want a refusal naming the pending migrations", err)
	}
}

// Two inboxes, one after the other, on one registry: the counts go on.
func TestMetricsSurviveARestartOnOneRegistry(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	reg := prometheus.NewRegistry()
	e.producer(t).sendIDs(t, 1, 10, 1)
	for _, want := range []int64{10, 5} {
		r := start(t, e, e.config(), record, inbox.WithRegisterer(reg))
		if want == 5 {
			e.producer(t).sendIDs(t, 11, 15, 1)
		}
		waitFor(t, 30*time.Second, "events applied", func() bool { return r.in.Stats().Applied >= want })
		if err := r.stop(); err != nil {
			t.Fatal(err)
		}
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == "outbox_inbox_applied_events_total" {
			if v := mf.GetMetric()[0].GetCounter().GetValue(); v != 15 {
				t.Fatalf("outbox_inbox_applied_events_total = %v after two inboxes applied 10 and 5, want 15", v)
			}
			return
		}
	}
	t.Fatal("outbox_inbox_applied_events_total not registered")
}
