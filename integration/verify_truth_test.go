package integration

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
	"github.com/outbox-relay/outbox-relay/verify"
)

// truth is a table and a one-partition topic for the verify tests, with a
// plain producer for records written by hand.
type truth struct {
	db    *testenv.DB
	k     *testenv.Kafka
	topic string
	cl    *kgo.Client
}

func newTruth(t *testing.T) *truth {
	t.Helper()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("ledger-")
	k := testenv.NewKafka(t, 1, topic)
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &truth{db: db, k: k, topic: topic, cl: cl}
}

// row writes one row and returns its id.
func (tr *truth) row(t *testing.T, key, value, headers string) int64 {
	t.Helper()
	var h any
	if headers != "" {
		h = headers
	}
	var id int64
	if err := tr.db.Pool.QueryRow(context.Background(), `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, $2, $3, $4::jsonb) RETURNING id`,
		tr.topic, []byte(key), []byte(value), h).Scan(&id); err != nil {
		t.Fatal(err)
	}
	return id
}

// produce writes a record by hand on partition 0 and returns its offset.
// As the relay does, it sends the event id of the row an "outbox-id"
// header names (in the table or the dead-letter table) right after that
// header, unless headers set "outbox-event-id" themselves; produceRaw
// sends headers exactly as given.
func (tr *truth) produce(t *testing.T, key, value string, headers ...string) int64 {
	t.Helper()
	if !slices.Contains(headers, txn.HeaderEventID) {
		for i := 0; i+1 < len(headers); i += 2 {
			if headers[i] != txn.HeaderOutboxID {
				continue
			}
			if ev := tr.eventID(t, headers[i+1]); ev != "" {
				headers = slices.Insert(slices.Clone(headers), i+2, txn.HeaderEventID, ev)
			}
			break
		}
	}
	return tr.produceRaw(t, key, value, headers...)
}

// eventID is the event id of the row (or dead letter) whose id is the
// decimal id, "" when there is none.
func (tr *truth) eventID(t *testing.T, id string) string {
	t.Helper()
	n, err := strconv.ParseInt(id, 10, 64)
	if err != nil {
		return ""
	}
	var ev *string
	if err := tr.db.Pool.QueryRow(context.Background(), `SELECT coalesce((SELECT event_id::text FROM outbox WHERE id = $1),
    (SELECT event_id::text FROM outbox_dead_letter WHERE id = $1))`, n).Scan(&ev); err != nil {
		t.Fatal(err)
	}
	if ev == nil {
		return ""
	}
	return *ev
}

// produceRaw writes a record with exactly the given headers on partition
// 0 and returns its offset.
func (tr *truth) produceRaw(t *testing.T, key, value string, headers ...string) int64 {
	t.Helper()
	r := &kgo.Record{Key: []byte(key), Value: []byte(value), Partition: 0}
	for i := 0; i+1 < len(headers); i += 2 {
		r.Headers = append(r.Headers, kgo.RecordHeader{Key: headers[i], Value: []byte(headers[i+1])})
	}
	got, err := tr.cl.ProduceSync(context.Background(), r).First()
	if err != nil {
		t.Fatal(err)
	}
	return got.Offset
}

func (tr *truth) markPublished(t *testing.T, ids ...int64) {
	t.Helper()
	if _, err := tr.db.Pool.Exec(context.Background(), `UPDATE outbox SET published_at = now() WHERE id = ANY($1)`, ids); err != nil {
		t.Fatal(err)
	}
}

func (tr *truth) verify(t *testing.T, mod func(*verify.Config)) (*verify.Report, error) {
	t.Helper()
	cfg := verify.Config{Pool: tr.db.Pool, Table: tr.db.Table, Brokers: tr.k.Brokers, Since: time.Hour}
	if mod != nil {
		mod(&cfg)
	}
	return verify.Run(context.Background(), cfg)
}

// relayAll runs the relay until every row is published, and stops it.
func (tr *truth) relayAll(t *testing.T) {
	t.Helper()
	run := testenv.StartRelay(t, tr.db, testenv.RelayConfig(tr.db, tr.k), relay.WithLogger(testenv.Logger(t, nil)))
	deadline := time.Now().Add(60 * time.Second)
	for tr.db.Unpublished(t) > 0 {
		if time.Now().After(deadline) {
			t.Fatalf("%d rows still unpublished", tr.db.Unpublished(t))
		}
		time.Sleep(50 * time.Millisecond)
	}
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
}

func findingIDs(rep *verify.Report, kind string) []int64 {
	var ids []int64
	for _, f := range rep.Findings {
		if f.Kind == kind {
			ids = append(ids, f.ID)
		}
	}
	slices.Sort(ids)
	return ids
}

// TestVerifyComparesHeadersAsTheRelaySentThem: the relay sends a row's
// headers sorted by name after outbox-id; a record whose headers repeat a
// name (type=refund, type=transfer for {"type":"transfer"}), add one, lack
// one or come in another order is `differ`, while the relay's own records of
// rows with several headers are clean.
func TestVerifyComparesHeadersAsTheRelaySentThem(t *testing.T) {
	tr := newTruth(t)
	good := tr.row(t, "k0", "v", `{"type":"transfer","b":"2","a":"1","zz":"3"}`)
	tr.relayAll(t)
	if rep, err := tr.verify(t, nil); err != nil || !rep.Clean() || rep.Records != 1 {
		t.Fatalf("the relay's record of row %d: %v, counts %v, findings %v", good, err, rep.Counts, rep.Findings)
	}
	id := func(n int64) string { return strconv.FormatInt(n, 10) }
	repeated := tr.row(t, "k1", "v", `{"type":"transfer"}`)
	tr.produce(t, "k1", "v", "outbox-id", id(repeated), "type", "refund", "type", "transfer")
	extra := tr.row(t, "k2", "v", `{"type":"transfer"}`)
	tr.produce(t, "k2", "v", "outbox-id", id(extra), "type", "transfer", "amount", "1000000")
	missingH := tr.row(t, "k3", "v", `{"a":"1","type":"transfer"}`)
	tr.produce(t, "k3", "v", "outbox-id", id(missingH), "type", "transfer")
	reordered := tr.row(t, "k4", "v", `{"a":"1","type":"transfer"}`)
	tr.produce(t, "k4", "v", "outbox-id", id(reordered), "type", "transfer", "a", "1")
	late := tr.row(t, "k5", "v", `{"a":"1"}`)
	tr.produceRaw(t, "k5", "v", txn.HeaderEventID, tr.eventID(t, id(late)), "outbox-id", id(late), "a", "1")
	tr.markPublished(t, repeated, extra, missingH, reordered, late)
	rep, err := tr.verify(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := findingIDs(rep, verify.Differ), []int64{repeated, extra, missingH, reordered, late}; !slices.Equal(got, want) || rep.Clean() {
		t.Fatalf("differ findings for ids %v, want %v (repeated, extra, missing, reordered headers, outbox-id not first); counts %v, findings %v", got, want, rep.Counts, rep.Findings)
	}
}

// TestVerifyReportsForeignRecords: records on an outbox topic without a
// valid outbox-id header (none, "abc", " 2", or the near-miss name
// Outbox-Id) are `foreign`, each listed with partition and offset, however
// harmless they look; -allow-foreign (AllowForeign) accepts them and still
// counts them.
func TestVerifyReportsForeignRecords(t *testing.T) {
	tr := newTruth(t)
	tr.row(t, "k", "v", "")
	tr.relayAll(t)
	want := []int64{
		tr.produce(t, "k", `{"amount":1000000}`),
		tr.produce(t, "k", `{"amount":1000000}`, "outbox-id", "abc"),
		tr.produce(t, "k", `{"amount":1000000}`, "outbox-id", " 2"),
		tr.produce(t, "k", `{"amount":1000000}`, "Outbox-Id", "1"),
		tr.produce(t, "k", `{"amount":1000000}`, "outbox-id", "0"),
	}
	rep, err := tr.verify(t, nil)
	if err != nil {
		t.Fatal(err)
	}
	var offs []int64
	for _, f := range rep.Findings {
		if f.Kind == "foreign" && f.Topic == tr.topic && f.Partition == 0 && len(f.Offsets) == 1 {
			offs = append(offs, f.Offsets[0])
		}
	}
	slices.Sort(offs)
	if rep.Clean() || rep.Counts["foreign"] != len(want) || !slices.Equal(offs, want) {
		t.Fatalf("foreign records at offsets %v: clean %v, counted %d, listed at %v; counts %v findings %v", want, rep.Clean(), rep.Counts["foreign"], offs, rep.Counts, rep.Findings)
	}
	rep, err = tr.verify(t, func(c *verify.Config) { c.AllowForeign = true })
	if err != nil || !rep.Clean() || rep.Foreign != len(want) {
		t.Fatalf("with AllowForeign: %v, clean %v, foreign %d (want %d counted), counts %v", err, rep.Clean(), rep.Foreign, len(want), rep.Counts)
	}
}

// TestVerifyCannotCheckWhenRetentionCutIntoTheWindow: the first copy of a
// duplicated row is deleted from the log (DeleteRecords moves the log start
// past it, as retention would): the second copy alone looks clean, so verify
// must exit "could not check" naming the partition, missing rows or not.
func TestVerifyCannotCheckWhenRetentionCutIntoTheWindow(t *testing.T) {
	tr := newTruth(t)
	first := tr.row(t, "k", "v", "")
	tr.db.Insert(t, tr.topic, 3, []string{"k"})
	tr.relayAll(t)
	tr.produce(t, "k", "v", "outbox-id", strconv.FormatInt(first, 10))
	if rep, err := tr.verify(t, nil); err != nil || rep.Counts[verify.Duplicate] != 1 {
		t.Fatalf("before the log start moved: %v, counts %v", err, rep.Counts)
	}
	adm := tr.k.Admin(t)
	off := kadm.Offsets{}
	off.AddOffset(tr.topic, 0, 1, -1)
	res, err := adm.DeleteRecords(context.Background(), off)
	if err != nil || res.Error() != nil {
		t.Fatalf("delete records: %v %v", err, res.Error())
	}
	rep, err := tr.verify(t, nil)
	if !errors.Is(err, verify.ErrCannotCheck) || !strings.Contains(err.Error(), tr.topic+"/0") {
		t.Fatalf("verify after the log start moved into the window: %v (counts %v), want ErrCannotCheck naming %s/0", err, rep.Counts, tr.topic)
	}
}

// TestVerifyIsNotBlindedByARowWithoutATopic: a row with an empty topic is
// dead-lettered (and discarded); verify reports it as such and checks the
// rest, here finding a duplicate.
func TestVerifyIsNotBlindedByARowWithoutATopic(t *testing.T) {
	tr := newTruth(t)
	ok := tr.row(t, "k", "v", "")
	var bad int64
	if err := tr.db.Pool.QueryRow(context.Background(), `INSERT INTO outbox (topic, key, value) VALUES ('', 'k2', 'v') RETURNING id`).Scan(&bad); err != nil {
		t.Fatal(err)
	}
	tr.relayAll(t)
	st := outbox.NewStore(tr.db.Pool, tr.db.Table)
	if ids, err := st.Discard(context.Background(), []int64{bad}, "no topic"); err != nil || len(ids) != 1 {
		t.Fatalf("discard %d: %v %v", bad, ids, err)
	}
	tr.produce(t, "k", "v", "outbox-id", strconv.FormatInt(ok, 10))
	rep, err := tr.verify(t, nil)
	if err != nil || rep.DeadLettered != 1 || !slices.Equal(findingIDs(rep, verify.Duplicate), []int64{ok}) || rep.InvalidTopic != 1 {
		t.Fatalf("verify with a dead-lettered row of topic '': %v; want the duplicate of %d found and the row counted as invalid_topic (report %+v)", err, ok, rep)
	}
}

// TestVerifyOrderUnderHoldKey: under hold-key, a key's ids 2 then 1 on one
// partition, both rows marked by one transaction (so both were read
// together: no late commit explains it), is a discrepancy; marked apart, it
// cannot be told from a late commit and stays a warning that says so.
func TestVerifyOrderUnderHoldKey(t *testing.T) {
	tr := newTruth(t)
	ids := tr.db.Insert(t, tr.topic, 2, []string{"k"})
	tr.produce(t, "k", "v1", "outbox-id", strconv.FormatInt(ids[1], 10))
	tr.produce(t, "k", "v0", "outbox-id", strconv.FormatInt(ids[0], 10))
	tr.markPublished(t, ids...)
	holdKey := func(c *verify.Config) { c.DeadLetterOrder = outbox.HoldKey }
	rep, err := tr.verify(t, holdKey)
	if err != nil || rep.Clean() || !slices.Equal(findingIDs(rep, verify.OrderBroken), []int64{ids[0]}) {
		t.Fatalf("ids %d then %d of one key, marked together, under hold-key: %v, clean %v, findings %v; want order_broken", ids[1], ids[0], err, rep.Clean(), rep.Findings)
	}
	if rep, err := tr.verify(t, func(c *verify.Config) { c.DeadLetterOrder = outbox.Skip }); err != nil || !rep.Clean() || rep.Counts[verify.OutOfOrder] != 1 {
		t.Fatalf("under skip: %v, clean %v, counts %v; want the out_of_order warning", err, rep.Clean(), rep.Counts)
	}

	late := tr.db.Insert(t, tr.topic, 2, []string{"j"})
	tr.produce(t, "j", "v1", "outbox-id", strconv.FormatInt(late[1], 10))
	tr.markPublished(t, late[1])
	tr.produce(t, "j", "v0", "outbox-id", strconv.FormatInt(late[0], 10))
	tr.markPublished(t, late[0])
	rep, err = tr.verify(t, holdKey)
	if err != nil || !slices.Equal(findingIDs(rep, verify.OutOfOrder), []int64{late[0]}) || rep.Counts[verify.OrderBroken] != 1 {
		t.Fatalf("ids %d then %d marked apart: %v, counts %v, findings %v; want an out_of_order warning", late[1], late[0], err, rep.Counts, rep.Findings)
	}
	for _, f := range rep.Findings {
		if f.Kind == verify.OutOfOrder && !strings.Contains(f.Detail, "cannot tell") {
			t.Errorf("the warning does not say the order cannot be told: %s", f.Detail)
		}
	}
}

// TestVerifyRollingWindowsCheckLatePublications: a row held 25 s behind a
// dead letter of its key, the dead letter requeued after 25 s, and a dead
// letter that reached Kafka 25 s after it was dead-lettered, each with a
// fault (a second copy of the held row and of the requeued row, the dead
// letter's record): `-since 20s` runs every 10 s find each.
func TestVerifyRollingWindowsCheckLatePublications(t *testing.T) {
	tr := newTruth(t)
	ctx := context.Background()
	poison := tr.row(t, "a", "p", `{"n":1}`) // a number: dead-lettered, key a held
	held := tr.row(t, "a", "h", "")
	dead := tr.row(t, "b", "d", `{"n":2}`)
	other := tr.row(t, "c", "o", "")
	cfg := testenv.RelayConfig(tr.db, tr.k)
	testenv.StartRelay(t, tr.db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	st := outbox.NewStore(tr.db.Pool, tr.db.Table)
	waitFor := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", what)
			}
			time.Sleep(100 * time.Millisecond)
		}
	}
	count := func(q string, args ...any) int {
		var n int
		if err := tr.db.Pool.QueryRow(ctx, q, args...).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
	waitFor("two dead letters and the other row published", func() bool {
		return count(`SELECT count(*) FROM outbox_dead_letter`) == 2 && count(`SELECT count(*) FROM outbox WHERE id = $1 AND published_at IS NOT NULL`, other) == 1
	})
	// The poison row reached Kafka before it was dead-lettered (a zombie
	// at-least-once relay): its requeue makes a second copy.
	tr.produce(t, "a", "p", "outbox-id", strconv.FormatInt(poison, 10), "n", "1")

	found := map[string][]int64{}
	start := time.Now()
	run := func() {
		rep, err := tr.verify(t, func(c *verify.Config) { c.Since = 20 * time.Second; c.Margin = time.Second })
		if err != nil {
			t.Fatalf("verify at %v: %v", time.Since(start).Round(time.Second), err)
		}
		for _, f := range rep.Findings {
			if !slices.Contains(found[f.Kind], f.ID) {
				found[f.Kind] = append(found[f.Kind], f.ID)
			}
		}
	}
	step := 0
	for next := start; time.Since(start) < 55*time.Second; next = next.Add(10 * time.Second) {
		time.Sleep(time.Until(next))
		run()
		step++
		if step == 3 { // 20 s in, then 25 s held when requeued below
			time.Sleep(time.Until(start.Add(25 * time.Second)))
			if _, err := tr.db.Pool.Exec(ctx, `UPDATE outbox_dead_letter SET headers = '{"n":"1"}' WHERE id = $1`, poison); err != nil {
				t.Fatal(err)
			}
			if ids, err := st.Requeue(ctx, []int64{poison}); err != nil || len(ids) != 1 {
				t.Fatalf("requeue %d: %v %v", poison, ids, err)
			}
			waitFor("the held row published", func() bool {
				return count(`SELECT count(*) FROM outbox WHERE id = $1 AND published_at IS NOT NULL`, held) == 1
			})
			tr.produce(t, "a", "h", "outbox-id", strconv.FormatInt(held, 10))
			tr.produce(t, "b", "d", "outbox-id", strconv.FormatInt(dead, 10), "n", "2")
		}
	}
	slices.Sort(found[verify.Duplicate])
	if !slices.Equal(found[verify.Duplicate], []int64{poison, held}) || !slices.Contains(found[verify.DeadInKafka], dead) {
		t.Fatalf("rolling -since 20s windows found %v; want duplicates of the requeued row %d and the held row %d, and dead letter %d in Kafka", found, poison, held, dead)
	}
}
