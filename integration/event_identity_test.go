package integration

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
	"github.com/outbox-relay/outbox-relay/verify"
)

// eventSink is an inbox in its own database whose handler records every
// event it applies (the record value, a token unique per event) in table
// sink, one row per application.
type eventSink struct {
	db *testenv.DB
}

// startEventSink starts an inbox of a new group on topic, in a new
// database, until the test ends.
func startEventSink(t *testing.T, k *testenv.Kafka, topic string) *eventSink {
	t.Helper()
	ctx := context.Background()
	db := testenv.NewDB(t)
	m, err := inbox.NewMigrator(db.Pool, "public", "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE sink (token text NOT NULL, outbox_id bigint NOT NULL, applied_at timestamptz NOT NULL DEFAULT clock_timestamp())`); err != nil {
		t.Fatal(err)
	}
	in, err := inbox.New(inbox.Config{Brokers: k.Brokers, Group: testenv.RandomName("sink-"), Topics: []string{topic}},
		db.Pool, func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
			_, err := tx.Exec(ctx, `INSERT INTO sink (token, outbox_id) VALUES ($1, $2)`, string(ev.Value), ev.OutboxID)
			return err
		}, inbox.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- in.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("inbox: %v", err)
		}
	})
	return &eventSink{db: db}
}

// insertTokens writes one row per token into db's outbox (plain SQL, the
// writers' contract), keyed by the token's index modulo 4.
func insertTokens(t *testing.T, db *testenv.DB, topic string, tokens []string) {
	t.Helper()
	keys := make([][]byte, len(tokens))
	vals := make([][]byte, len(tokens))
	for i, tok := range tokens {
		keys[i], vals[i] = []byte("k"+strconv.Itoa(i%4)), []byte(tok)
	}
	if _, err := db.Pool.Exec(context.Background(), `INSERT INTO outbox (topic, key, value)
SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) WITH ORDINALITY AS u(k, v, n) ORDER BY n`, topic, keys, vals); err != nil {
		t.Fatal(err)
	}
}

func eventTokens(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = prefix + strconv.Itoa(i)
	}
	return out
}

// requireAppliedOnce waits until every token was applied (or timeout),
// lets a duplicate arrive, and fails naming the tokens applied never or
// more than once.
func (s *eventSink) requireAppliedOnce(t *testing.T, want []string, timeout time.Duration) {
	t.Helper()
	ctx := context.Background()
	count := func() map[string]int {
		rows, err := s.db.Pool.Query(ctx, `SELECT token, count(*)::int FROM sink GROUP BY token`)
		if err != nil {
			t.Fatal(err)
		}
		got := map[string]int{}
		var tok string
		var n int
		if _, err := pgx.ForEachRow(rows, []any{&tok, &n}, func() error { got[tok] = n; return nil }); err != nil {
			t.Fatal(err)
		}
		return got
	}
	deadline := time.Now().Add(timeout)
	for {
		got := count()
		all := true
		for _, w := range want {
			if got[w] == 0 {
				all = false
				break
			}
		}
		if all || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	time.Sleep(time.Second) // a duplicate would be applied by now
	got := count()
	var missing, twice []string
	for _, w := range want {
		switch n := got[w]; {
		case n == 0:
			missing = append(missing, w)
		case n > 1:
			twice = append(twice, fmt.Sprintf("%s x%d", w, n))
		}
	}
	var extra []string
	for tok := range got {
		if !slices.Contains(want, tok) {
			extra = append(extra, tok)
		}
	}
	if len(missing)+len(twice)+len(extra) > 0 {
		slices.Sort(missing)
		t.Fatalf("of %d events the inbox applied %d: never applied %d %v; applied more than once %v; not written %v",
			len(want), len(want)-len(missing), len(missing), firstFew(missing), twice, extra)
	}
}

func firstFew[T any](s []T) []T {
	if len(s) > 12 {
		return s[:12]
	}
	return s
}

// TestEventIdentityTwoTablesOneTopic: two outbox tables in two databases
// (two services) feed one topic, so their row ids are the same 1..n; the
// one inbox must apply every event of both once, not take the second
// table's events for duplicates of the first's.
func TestEventIdentityTwoTablesOneTopic(t *testing.T) {
	topic := testenv.RandomName("shared-")
	k := testenv.NewKafka(t, 3, topic)
	a, b := testenv.NewDB(t), testenv.NewDB(t)
	sink := startEventSink(t, k, topic)
	testenv.StartRelay(t, a, testenv.RelayConfig(a, k))
	testenv.StartRelay(t, b, testenv.RelayConfig(b, k))
	wantA, wantB := eventTokens("a-", 40), eventTokens("b-", 40)
	insertTokens(t, a, topic, wantA[:20])
	insertTokens(t, b, topic, wantB[:20])
	insertTokens(t, b, topic, wantB[20:])
	insertTokens(t, a, topic, wantA[20:])
	sink.requireAppliedOnce(t, append(wantA, wantB...), 30*time.Second)
}

// TestEventIdentityRestoredSequence: the outbox table's ids start over,
// once by TRUNCATE ... RESTART IDENTITY, once as a restore from an earlier
// dump does (the rows after the dump are gone and the sequence is back where
// the dump took it: DELETE and setval), and once by a real pg_dump restored
// with psql; each time new rows reuse published ids. Every
// new event must be applied once, with no operator setval.
func TestEventIdentityRestoredSequence(t *testing.T) {
	ctx := context.Background()
	topic := testenv.RandomName("restored-")
	k := testenv.NewKafka(t, 3, topic)
	db := testenv.NewDB(t)
	sink := startEventSink(t, k, topic)
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k))

	before := eventTokens("before-", 20)
	insertTokens(t, db, topic, before)
	sink.requireAppliedOnce(t, before, 30*time.Second)
	// A dump of the table now (ids 1..20, published), restored at the end.
	dump, err := exec.Command("pg_dump", "--data-only", "--table=public.outbox", db.URL).Output()
	if err != nil {
		t.Fatalf("pg_dump: %v", err)
	}
	if !strings.Contains(string(dump), "setval") {
		t.Fatalf("the dump does not set the sequence back:\n%s", dump)
	}

	if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox RESTART IDENTITY`); err != nil {
		t.Fatal(err)
	}
	truncated := eventTokens("after-truncate-", 20)
	insertTokens(t, db, topic, truncated) // ids 1..20 again
	want := append(slices.Clone(before), truncated...)
	sink.requireAppliedOnce(t, want, 30*time.Second)

	// The restore of a dump taken when the table held ids 1..10: the rows
	// after it are gone, and the sequence is back at 10.
	if _, err := db.Pool.Exec(ctx, `DELETE FROM outbox WHERE id > 10`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `SELECT setval(pg_get_serial_sequence('outbox', 'id'), 10)`); err != nil {
		t.Fatal(err)
	}
	restored := eventTokens("after-restore-", 20)
	insertTokens(t, db, topic, restored) // ids 11..30: 11..20 again
	want = append(want, restored...)
	sink.requireAppliedOnce(t, want, 30*time.Second)

	// The real thing: the dump taken after the first rows, restored with
	// psql into the emptied table; its sequence goes back to 20.
	if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox`); err != nil {
		t.Fatal(err)
	}
	psql := exec.Command("psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", db.URL)
	psql.Stdin = bytes.NewReader(dump)
	if out, err := psql.CombinedOutput(); err != nil {
		t.Fatalf("psql restore: %v\n%s", err, out)
	}
	dumped := eventTokens("after-dump-restore-", 20)
	insertTokens(t, db, topic, dumped) // ids 21..40: 21..30 again
	var first int64
	if err := db.Pool.QueryRow(ctx, `SELECT min(id) FROM outbox WHERE convert_from(value, 'UTF8') LIKE 'after-dump-restore-%'`).Scan(&first); err != nil || first != 21 {
		t.Fatalf("after the restore of the dump the new rows start at id %d (%v), want 21: the dump did not rewind the sequence", first, err)
	}
	want = append(want, dumped...)
	sink.requireAppliedOnce(t, want, 30*time.Second)
}

// TestVerifyChecksTheEventID: verify expects the relay's outbox-event-id
// header, the row's event_id, right after outbox-id: the relay's own
// records are clean, a record of a row with an event id whose header is
// another id or missing is `differ`, and a row from before migration 7
// (event_id NULL) is clean without it.
func TestVerifyChecksTheEventID(t *testing.T) {
	ctx := context.Background()
	tr := newTruth(t)
	tr.row(t, "k0", "v", `{"type":"transfer"}`)
	tr.row(t, "k0", "v", "")
	tr.relayAll(t)
	if rep, err := tr.verify(t, nil); err != nil || !rep.Clean() || rep.Records != 2 {
		t.Fatalf("the relay's records: %v, counts %v, findings %v", err, rep.Counts, rep.Findings)
	}
	id := func(n int64) string { return strconv.FormatInt(n, 10) }
	wrong := tr.row(t, "k1", "v", `{"type":"transfer"}`)
	tr.produceRaw(t, "k1", "v", "outbox-id", id(wrong), txn.HeaderEventID, outbox.NewEventID(), "type", "transfer")
	missing := tr.row(t, "k2", "v", `{"type":"transfer"}`)
	tr.produceRaw(t, "k2", "v", "outbox-id", id(missing), "type", "transfer")
	// A row written before migration 7 has no event id.
	if _, err := tr.db.Pool.Exec(ctx, `ALTER TABLE outbox DROP CONSTRAINT outbox_event_id_set`); err != nil {
		t.Fatal(err)
	}
	var old int64
	if err := tr.db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers, event_id) VALUES ($1, 'k3', 'v', '{"type":"transfer"}', NULL) RETURNING id`, tr.topic).Scan(&old); err != nil {
		t.Fatal(err)
	}
	tr.produceRaw(t, "k3", "v", "outbox-id", id(old), "type", "transfer")
	tr.markPublished(t, wrong, missing, old)
	rep, err := tr.verify(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := findingIDs(rep, verify.Differ), []int64{wrong, missing}; !slices.Equal(got, want) || rep.Clean() {
		t.Fatalf("differ findings for ids %v, want %v (another event id, no event id; row %d has none and is clean); counts %v, findings %v", got, want, old, rep.Counts, rep.Findings)
	}
}

// TestEventIdentityWriterKeyIsAppliedOnce: a writer that sets the event id
// itself (an idempotency key) and writes one business event twice (a
// retried request) gets it applied once, while events with their own ids
// are all applied.
func TestEventIdentityWriterKeyIsAppliedOnce(t *testing.T) {
	ctx := context.Background()
	topic := testenv.RandomName("keyed-")
	k := testenv.NewKafka(t, 3, topic)
	db := testenv.NewDB(t)
	sink := startEventSink(t, k, topic)
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k))
	key := outbox.NewEventID()
	for range 2 {
		if err := db.Table.Write(ctx, db.Pool, outbox.Message{Topic: topic, Key: []byte("k"), Value: []byte("keyed"), EventID: key},
			outbox.Message{Topic: topic, Key: []byte("k"), Value: []byte("own-" + outbox.NewEventID())}); err != nil {
			t.Fatal(err)
		}
	}
	rows, err := db.Pool.Query(ctx, `SELECT convert_from(value, 'UTF8') FROM outbox WHERE value <> 'keyed'`)
	if err != nil {
		t.Fatal(err)
	}
	own, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	sink.requireAppliedOnce(t, append(own, "keyed"), 30*time.Second)
}

// TestEventIdentitySurvivesTheDeadLetterTable: a row whose headers set
// outbox-event-id (any case) is dead-lettered with an error naming the
// column to use instead, and keeps its event id there; requeued, in place
// or as a new row, it is published with that same event id.
func TestEventIdentitySurvivesTheDeadLetterTable(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("dead-")
	k := testenv.NewKafka(t, 1, topic)
	events := map[int64]string{}
	for _, key := range []string{"a", "b"} {
		var id int64
		var ev string
		if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, $2, 'v', '{"Outbox-Event-Id":"x"}') RETURNING id, event_id::text`,
			topic, []byte(key)).Scan(&id, &ev); err != nil {
			t.Fatal(err)
		}
		events[id] = ev
	}
	cfg := testenv.RelayConfig(db, k)
	run := testenv.StartRelay(t, db, cfg)
	store := outbox.NewStore(db.Pool, db.Table)
	deadline := time.Now().Add(30 * time.Second)
	var dead []outbox.DeadRow
	for {
		var err error
		if dead, err = store.ListDeadLetters(ctx, 10); err != nil {
			t.Fatal(err)
		}
		if len(dead) == 2 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(dead) != 2 {
		t.Fatalf("dead letters %+v, want both rows", dead)
	}
	for _, d := range dead {
		if !strings.Contains(d.Error, `"Outbox-Event-Id"`) || !strings.Contains(d.Error, "event_id column") {
			t.Errorf("dead letter %d: error %q does not name the header and the event_id column", d.ID, d.Error)
		}
		var ev string
		if err := db.Pool.QueryRow(ctx, `SELECT event_id::text FROM outbox_dead_letter WHERE id = $1`, d.ID).Scan(&ev); err != nil || ev != events[d.ID] {
			t.Errorf("dead letter %d: event_id %q, %v; the row had %q", d.ID, ev, err, events[d.ID])
		}
	}
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox_dead_letter SET headers = '{"type":"fixed"}'`); err != nil {
		t.Fatal(err)
	}
	ids := []int64{dead[0].ID, dead[1].ID}
	if got, err := store.Requeue(ctx, ids[:1]); err != nil || len(got) != 1 {
		t.Fatalf("requeue: %v, %v", got, err)
	}
	asNew, err := store.RequeueAsNew(ctx, ids[1:])
	if err != nil || len(asNew) != 1 {
		t.Fatalf("requeue as new: %v, %v", asNew, err)
	}
	want := map[int64]string{ids[0]: events[ids[0]], asNew[0]: events[ids[1]]}
	seen := k.NewConsumer(t, topic).WaitFor(t, 2, 30*time.Second)
	for _, s := range seen {
		if w, ok := want[s.ID]; !ok || s.Headers[txn.HeaderEventID] != w {
			t.Errorf("record of row %d: outbox-event-id %q, want %q (the dead letter's)", s.ID, s.Headers[txn.HeaderEventID], w)
		}
	}
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
}
