package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"database/sql"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	_ "github.com/jackc/pgx/v5/stdlib" // database/sql driver "pgx"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// javaPartition is the partition Kafka's Java client picks for key among n
// (murmur2), computed by franz-go's StickyKeyPartitioner, which matches it.
func javaPartition(key []byte, n int) int32 {
	return int32(kgo.StickyKeyPartitioner(nil).ForTopic("t").Partition(&kgo.Record{Key: key}, n))
}

// TestEveryWritePathReachesKafkaOnceIntact writes rows through outbox.Write
// (pgx.Tx), WriteMany (COPY), WriteSQL (*sql.Tx) and plain SQL, with keys,
// headers, tombstones, empty values and explicit partitions, and checks that
// each arrives once, byte for byte, on the right partition, in id order per
// key; a rolled-back write never arrives.
func TestEveryWritePathReachesKafkaOnceIntact(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "orders")
	p2 := int32(2)

	type want struct {
		key, value []byte
		headers    map[string]string
		partition  int32  // -1: by key
		eventID    string // "": drawn by Write or the column default
	}
	var expect []want

	// 1. outbox.Write inside a pgx transaction.
	tx, err := db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []outbox.Message{
		{Topic: "orders", Key: []byte("acct-1"), Value: []byte(`{"n":1}`), Headers: map[string]string{"type": "created", "trace": "abc"},
			EventID: "0b7c4c1e-3f4a-4d2b-9a55-0123456789ab"},
		{Topic: "orders", Key: []byte("acct-1"), Value: nil}, // tombstone
		{Topic: "orders", Key: []byte("acct-2"), Value: []byte{}},
		{Topic: "orders", Key: []byte("pinned-1"), Value: []byte{0, 1, 2, 255}, Partition: &p2},
		{Topic: "orders", Key: nil, Value: []byte("keyless")},
	}
	if err := db.Table.Write(ctx, tx, msgs...); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	for _, m := range msgs {
		p := int32(-1)
		if m.Partition != nil {
			p = *m.Partition
		}
		expect = append(expect, want{m.Key, m.Value, m.Headers, p, m.EventID})
	}

	// 2. A rolled-back write: never published.
	tx, err = db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Table.Write(ctx, tx, outbox.Message{Topic: "orders", Key: []byte("acct-1"), Value: []byte("rolled back")}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Rollback(ctx); err != nil {
		t.Fatal(err)
	}

	// 3. WriteMany: COPY for a large batch.
	tx, err = db.Pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var many []outbox.Message
	for i := range outbox.CopyThreshold + 36 {
		m := outbox.Message{Topic: "orders", Key: []byte("acct-" + strconv.Itoa(i%7)), Value: []byte("copy-" + strconv.Itoa(i)),
			Headers: map[string]string{"i": strconv.Itoa(i)}}
		if i == 5 {
			m.Value = nil
		}
		if i == 7 {
			m.EventID = "7E57C0DE-0000-4000-8000-00000000C0FF" // COPY, upper case: stored and sent in lower case
		}
		many = append(many, m)
		expect = append(expect, want{m.Key, m.Value, m.Headers, -1, strings.ToLower(m.EventID)})
	}
	if err := db.Table.WriteMany(ctx, tx, many); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	// 4. database/sql.
	sdb, err := sql.Open("pgx", db.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer sdb.Close()
	stx, err := sdb.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	sqlMsgs := []outbox.Message{
		{Topic: "orders", Key: []byte("acct-2"), Value: []byte("via database/sql"), Headers: map[string]string{"src": "sql"}},
		{Topic: "orders", Key: []byte("pinned-2"), Value: nil, Partition: &p2},
	}
	if err := db.Table.WriteSQL(ctx, stx, sqlMsgs...); err != nil {
		t.Fatal(err)
	}
	if err := stx.Commit(); err != nil {
		t.Fatal(err)
	}
	for _, m := range sqlMsgs {
		p := int32(-1)
		if m.Partition != nil {
			p = *m.Partition
		}
		expect = append(expect, want{m.Key, m.Value, m.Headers, p, ""})
	}

	// 5. Plain SQL, as any language would write it (the README contract).
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value, headers)
		VALUES ('orders', 'acct-1', '{"amount":100}', '{"type":"transfer"}')`); err != nil {
		t.Fatal(err)
	}
	expect = append(expect, want{[]byte("acct-1"), []byte(`{"amount":100}`), map[string]string{"type": "transfer"}, -1, ""})
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value, event_id) VALUES ('orders', convert_to('acct-3', 'UTF8'), NULL, '6f1c2a5e-0d1b-4c1e-9a7e-2f8d9c3b4a10')`); err != nil {
		t.Fatal(err)
	}
	expect = append(expect, want{[]byte("acct-3"), nil, nil, -1, "6f1c2a5e-0d1b-4c1e-9a7e-2f8d9c3b4a10"})

	rows, err := db.Pool.Query(ctx, `SELECT id, event_id::text FROM outbox ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var ids []int64
	eventIDs := map[int64]string{}
	var id int64
	var ev string
	if _, err := pgx.ForEachRow(rows, []any{&id, &ev}, func() error { ids = append(ids, id); eventIDs[id] = ev; return nil }); err != nil {
		t.Fatal(err)
	}
	if len(ids) != len(expect) {
		t.Fatalf("outbox holds %d rows, wrote %d (the rolled-back one must not be there)", len(ids), len(expect))
	}

	testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithLogger(testenv.Logger(t, nil)))
	seen := k.NewConsumer(t, "orders").WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)

	byID := map[int64]testenv.Seen{}
	for _, s := range seen {
		byID[s.ID] = s
	}
	for i, id := range ids {
		w, s := expect[i], byID[id]
		if !bytes.Equal(s.Key, w.key) || (s.Key == nil) != (w.key == nil) {
			t.Errorf("id %d: key %q, want %q", id, s.Key, w.key)
		}
		if !bytes.Equal(s.Value, w.value) || (s.Value == nil) != (w.value == nil) {
			t.Errorf("id %d: value %q (nil=%v), want %q (nil=%v)", id, s.Value, s.Value == nil, w.value, w.value == nil)
		}
		if s.Headers["outbox-id"] != strconv.FormatInt(id, 10) {
			t.Errorf("id %d: outbox-id header %q", id, s.Headers["outbox-id"])
		}
		for hk, hv := range w.headers {
			if s.Headers[hk] != hv {
				t.Errorf("id %d: header %s = %q, want %q", id, hk, s.Headers[hk], hv)
			}
		}
		if s.Headers["outbox-event-id"] != eventIDs[id] || w.eventID != "" && eventIDs[id] != w.eventID {
			t.Errorf("id %d: outbox-event-id header %q, the row's event_id %q, the writer set %q", id, s.Headers["outbox-event-id"], eventIDs[id], w.eventID)
		}
		if len(s.Headers) != len(w.headers)+2 {
			t.Errorf("id %d: headers %v, want %v plus outbox-id and outbox-event-id", id, s.Headers, w.headers)
		}
		switch {
		case w.partition >= 0:
			if s.Partition != w.partition {
				t.Errorf("id %d: partition %d, want explicit %d", id, s.Partition, w.partition)
			}
		case w.key != nil:
			if p := javaPartition(w.key, 4); s.Partition != p {
				t.Errorf("id %d: key %q on partition %d, Kafka's murmur2 says %d", id, w.key, s.Partition, p)
			}
		}
	}
	if n := db.Unpublished(t); n != 0 {
		t.Errorf("%d rows still unpublished after delivery", n)
	}
}

// TestBadRowsGoToDeadLetterNotTheFloor writes rows the relay cannot publish
// (invalid topic, headers that are not strings, a partition the topic does
// not have) between good ones: the bad rows move to the dead-letter table
// with an error naming the column, the good ones flow on, nothing is lost,
// and a requeued row is published after the fix.
func TestBadRowsGoToDeadLetterNotTheFloor(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 2, "orders")
	exec := func(q string) {
		t.Helper()
		if _, err := db.Pool.Exec(ctx, q); err != nil {
			t.Fatal(err)
		}
	}
	exec(`INSERT INTO outbox (topic, key, value) VALUES ('orders', 'a', 'good-1')`)
	exec(`INSERT INTO outbox (topic, key, value) VALUES ('bad topic!', 'a', 'x')`)
	exec(`INSERT INTO outbox (topic, key, value, headers) VALUES ('orders', 'a', 'x', '{"n": 5}')`)
	exec(`INSERT INTO outbox (topic, key, value, partition) VALUES ('orders', 'a', 'x', 7)`)
	exec(`INSERT INTO outbox (topic, key, value) VALUES ('orders', 'a', 'good-2')`)
	cfg := testenv.RelayConfig(db, k)
	// OUTBOX_DEAD_LETTER_ORDER=skip: the later rows of a dead letter's key
	// are published without it (hold-key, the default, is
	// TestDeadLetterHoldsTheLaterRowsOfItsKey).
	cfg.DeadLetterOrder = "skip"
	// A row aimed at the checkpoint topic could forge a checkpoint.
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value, partition) VALUES ($1, 'k', '{"v":1,"ids":[1]}', 0)`, cfg.CheckpointTopic); err != nil {
		t.Fatal(err)
	}

	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	seen := k.NewConsumer(t, "orders").WaitFor(t, 2, 30*time.Second)
	testenv.CheckExactlyOnce(t, []int64{1, 5}, seen)

	st := outbox.NewStore(db.Pool, db.Table)
	var dead []outbox.DeadRow
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		if dead, err := st.ListDeadLetters(ctx, 10); err == nil && len(dead) == 4 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	dead, err := st.ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 4 {
		t.Fatalf("dead letters: %d, want 4: %+v", len(dead), dead)
	}
	for i, frag := range []string{"column topic", `column headers: value of "n" is a number`, "partition 7 does not exist", "checkpoint topic"} {
		if !bytes.Contains([]byte(dead[i].Error), []byte(frag)) {
			t.Errorf("dead letter %d error %q does not name %q", dead[i].ID, dead[i].Error, frag)
		}
	}
	var total int
	if err := db.Pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM outbox_dead_letter)`).Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != 6 {
		t.Fatalf("outbox + dead letters hold %d rows, wrote 6: a row was lost", total)
	}

	// Fix the row with the bad headers and requeue it, as a new row: under
	// skip its key's later rows are out already, so its place is after them.
	exec(`UPDATE outbox_dead_letter SET headers = '{"n": "5"}' WHERE id = 3`)
	newIDs, err := st.RequeueAsNew(ctx, []int64{3})
	if err != nil || len(newIDs) != 1 {
		t.Fatalf("requeue: %v %v", newIDs, err)
	}
	c := k.NewConsumer(t, "orders")
	seen = c.WaitFor(t, 3, 30*time.Second)
	testenv.CheckExactlyOnce(t, []int64{1, 5, newIDs[0]}, seen)
}

// TestRecordTooLargeIsIsolatedAndDeadLettered: Kafka refuses one record of a
// batch (MESSAGE_TOO_LARGE against the topic's max.message.bytes). The relay
// aborts, splits the batch until the refused row stands alone, moves it to the
// dead-letter table with Kafka's error, and publishes the others once, in
// order.
func TestRecordTooLargeIsIsolatedAndDeadLettered(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1)
	limit := "20000"
	k.CreateTopicsWithConfig(t, 1, map[string]*string{"max.message.bytes": &limit}, "small")
	var msgs []outbox.Message
	for i := range 20 {
		v := []byte("ok-" + strconv.Itoa(i))
		if i == 13 {
			v = make([]byte, 60000)
			_, _ = rand.Read(v) // incompressible: the producer compresses batches
		}
		msgs = append(msgs, outbox.Message{Topic: "small", Key: []byte("k"), Value: v})
	}
	if err := db.Table.Write(ctx, db.Pool, msgs...); err != nil {
		t.Fatal(err)
	}
	// Isolation alone: under hold-key (the default) row 14 would hold the
	// later rows of key k.
	cfg := testenv.RelayConfig(db, k)
	cfg.DeadLetterOrder = "skip"
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	var want []int64
	for id := int64(1); id <= 20; id++ {
		if id != 14 {
			want = append(want, id)
		}
	}
	seen := k.NewConsumer(t, "small").WaitFor(t, len(want), 60*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)
	dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].ID != 14 || !bytes.Contains([]byte(dead[0].Error), []byte("MESSAGE_TOO_LARGE")) {
		t.Fatalf("dead letters = %+v, want row 14 with MESSAGE_TOO_LARGE", dead)
	}
	// The relay knew the topic's limit and refused the row before sending
	// it, naming both figures.
	if !bytes.Contains([]byte(dead[0].Error), []byte("max.message.bytes")) || !bytes.Contains([]byte(dead[0].Error), []byte("20000")) {
		t.Fatalf("dead letter error %q does not name the topic's max.message.bytes (20000)", dead[0].Error)
	}
}
