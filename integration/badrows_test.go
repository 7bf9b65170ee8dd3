package integration

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// badRowsDeadLetters returns the table's dead letters by id, waiting until
// there are n.
func badRowsDeadLetters(t *testing.T, st *outbox.Store, n int) map[int64]outbox.DeadRow {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		dead, err := st.ListDeadLetters(context.Background(), 100)
		if err != nil {
			t.Fatal(err)
		}
		if len(dead) >= n {
			out := map[int64]outbox.DeadRow{}
			for _, d := range dead {
				out[d.ID] = d
			}
			return out
		}
		if time.Now().After(deadline) {
			var got []string
			for _, d := range dead {
				got = append(got, fmt.Sprintf("%d: %.200s", d.ID, d.Error))
			}
			t.Fatalf("%d dead letters, want %d: %q", len(dead), n, got)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// keyOf returns the ids of seen whose key is key, in the order seen.
func keyOf(seen []testenv.Seen, key []byte) []int64 {
	var ids []int64
	for _, s := range seen {
		if bytes.Equal(s.Key, key) {
			ids = append(ids, s.ID)
		}
	}
	return ids
}

// TestLongKeysAreDeadLetteredAndHeld: keys are bytes of any length Kafka
// accepts. A row with a 3,200-byte key and an invalid topic, and rows with
// a 3,200-byte and a 2 MiB key and bad headers, are dead-lettered (a btree
// entry of the key itself is limited to about 2,700 bytes: the dead-letter
// insert failed, and the shard stopped on that row); the later rows of
// their keys are held (hold-key), the other rows published; fixed and
// requeued, every key's rows reach Kafka in id order. With two shards the
// outbox's own shard index is on a hash of the key, so long keys pass it
// too.
func TestLongKeysAreDeadLetteredAndHeld(t *testing.T) {
	for _, shards := range []int{1, 2} {
		t.Run(fmt.Sprintf("shards=%d", shards), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic := testenv.RandomName("ledger-")
			k := testenv.NewKafka(t, 2)
			limit := "8388608"
			k.CreateTopicsWithConfig(t, 2, map[string]*string{"max.message.bytes": &limit}, topic)
			// Random bytes: PostgreSQL compresses a repetitive key, which
			// would fit in an index entry.
			long := make([]byte, 3200)
			huge := make([]byte, 2<<20) // 2 MiB, NUL bytes included
			rand.Read(long)
			rand.Read(huge)
			rows := []struct {
				topic   string
				key     []byte
				headers any
			}{
				{"bad topic!", long, nil}, // 1: dead letter (topic)
				{topic, long, `{"n": 5}`}, // 2: dead letter (headers), holds long
				{topic, long, nil},        // 3: held
				{topic, huge, `{"n": 6}`}, // 4: dead letter (headers), holds huge
				{topic, huge, nil},        // 5: held
				{topic, []byte("s"), nil}, // 6: published
				{topic, long, nil},        // 7: held
				{"bad topic!", huge, nil}, // 8: dead letter (topic)
				{topic, []byte("s"), nil}, // 9: published
			}
			tx, err := db.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for i, r := range rows {
				if _, err := tx.Exec(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, $2, $3, $4::jsonb)`,
					r.topic, r.key, fmt.Sprintf("v%d", i+1), r.headers); err != nil {
					t.Fatal(err)
				}
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			cfg := testenv.RelayConfig(db, k)
			cfg.Shards = shards
			cfg.BatchMaxBytes = 8 << 20
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))

			st := outbox.NewStore(db.Pool, db.Table)
			dead := badRowsDeadLetters(t, st, 4)
			for id, want := range map[int64]string{1: "column topic", 2: "column headers", 4: "column headers", 8: "column topic"} {
				if d, ok := dead[id]; !ok || !strings.Contains(d.Error, want) {
					t.Errorf("dead letter %d: %+v, want its error to name %q", id, d.Error, want)
				}
			}
			if len(dead) != 4 {
				t.Fatalf("dead letters %v, want 1 2 4 8", slices.Sorted(func(yield func(int64) bool) {
					for id := range dead {
						if !yield(id) {
							return
						}
					}
				}))
			}
			c := k.NewConsumer(t, topic)
			seen := c.WaitFor(t, 2, 30*time.Second)
			testenv.CheckExactlyOnce(t, []int64{6, 9}, seen)
			waitHeld(t, st, shards, 3, 2)

			// Fixed and requeued: every key in id order.
			if _, err := db.Pool.Exec(ctx, `UPDATE outbox_dead_letter SET headers = '{"n": "fixed"}' WHERE id IN (2, 4)`); err != nil {
				t.Fatal(err)
			}
			if ids, err := st.Requeue(ctx, []int64{2, 4}); err != nil || !slices.Equal(ids, []int64{2, 4}) {
				t.Fatalf("requeue: %v %v", ids, err)
			}
			seen = c.WaitFor(t, 7, 60*time.Second)
			testenv.CheckExactlyOnce(t, []int64{2, 3, 4, 5, 6, 7, 9}, seen)
			if got := keyOf(seen, long); !slices.Equal(got, []int64{2, 3, 7}) {
				t.Errorf("the 3,200-byte key reached Kafka as %v, want 2 3 7", got)
			}
			if got := keyOf(seen, huge); !slices.Equal(got, []int64{4, 5}) {
				t.Errorf("the 2 MiB key reached Kafka as %v, want 4 5", got)
			}
			waitHeld(t, st, shards, 0, 0)
		})
	}
}

// TestOversizeRowIsDeadLetteredWithoutItsValue: a row larger than the
// largest record the relay sends (OUTBOX_KAFKA_BATCH_SIZE, 1 MiB by
// default) is dead-lettered by its size, with the sizes and the limit in
// its reason, without its value ever being read into the relay: the
// relay's allocations while it dead-letters a 64 MiB value stay far below
// 64 MiB (before: the value was read, about twice over, to be refused by
// the producer's check). The dead letter holds the value byte for byte (the
// move copies it inside PostgreSQL). A row whose key alone passes the limit
// is dead-lettered the same way, and the later rows of both keys are held,
// the others published.
func TestOversizeRowIsDeadLetteredWithoutItsValue(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("blobs-")
	k := testenv.NewKafka(t, 2, topic)
	// Written by the server: the test process never holds the values.
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES
    ($1, 'a', 'small'),
    ($1, 'a', convert_to(repeat('x', 64 << 20), 'UTF8')),
    ($1, 'a', 'held'),
    ($1, convert_to(repeat('k', 2 << 20), 'UTF8'), 'huge key'),
    ($1, 'b', 'free'),
    ($1, convert_to(repeat('k', 2 << 20), 'UTF8'), 'huge key, held'),
    ($1, NULL, 'keyless')`, topic); err != nil {
		t.Fatal(err)
	}
	cfg := testenv.RelayConfig(db, k)
	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	st := outbox.NewStore(db.Pool, db.Table)
	// Counted, not listed: ListDeadLetters reads the values.
	deadline := time.Now().Add(30 * time.Second)
	for n := 0; n < 2; {
		if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox_dead_letter`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d dead letters after 30 s, want 2", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
	runtime.ReadMemStats(&after)
	dead := badRowsDeadLetters(t, st, 2)
	// dlq list reads a dead letter's value only up to 1 MiB, its size always.
	var listed runtime.MemStats
	runtime.ReadMemStats(&listed)
	if alloc := listed.TotalAlloc - after.TotalAlloc; alloc > 16<<20 {
		t.Errorf("listing the dead letters allocated %d MiB: it read the 64 MiB value", alloc>>20)
	}
	if d := dead[2]; d.Value != nil || d.ValueBytes == nil || *d.ValueBytes != 64<<20 {
		t.Errorf("dead letter 2 listed with a value of %d bytes and size %v, want no value and size %d", len(d.Value), d.ValueBytes, 64<<20)
	}
	alloc := after.TotalAlloc - before.TotalAlloc
	t.Logf("allocated %.1f MiB while dead-lettering a 64 MiB row", float64(alloc)/(1<<20))
	if alloc > 32<<20 {
		t.Errorf("the relay allocated %d MiB while it dead-lettered a 64 MiB row: it read the value", alloc>>20)
	}
	for id, want := range map[int64]string{
		2: "row is 67108865 bytes (key 1, value 67108864, headers 0 as JSON text), more than 1048576",
		4: "row is 2097160 bytes (key 2097152, value 8, headers 0 as JSON text), more than 1048576",
	} {
		if d, ok := dead[id]; !ok || !strings.Contains(d.Error, want) || !strings.Contains(d.Error, "OUTBOX_KAFKA_BATCH_SIZE") {
			t.Errorf("dead letter %d: %.300q, want its error to say %q and name OUTBOX_KAFKA_BATCH_SIZE", id, d.Error, want)
		}
	}
	if len(dead) != 2 {
		t.Errorf("%d dead letters, want rows 2 and 4", len(dead))
	}
	var same bool
	if err := db.Pool.QueryRow(ctx, `SELECT md5(value) = md5(convert_to(repeat('x', 64 << 20), 'UTF8')) FROM outbox_dead_letter WHERE id = 2`).Scan(&same); err != nil || !same {
		t.Errorf("the dead letter's value is not the row's: %v %v", same, err)
	}
	seen := k.NewConsumer(t, topic).WaitFor(t, 3, 30*time.Second)
	testenv.CheckExactlyOnce(t, []int64{1, 5, 7}, seen)
	waitHeld(t, st, 1, 2, 2)
}

// badRowCase is one row of TestEveryUnpublishableRowIsDeadLetteredWithItsReason.
type badRowCase struct {
	name      string
	topic     string // "T": the test's topic, "C": its compacted topic, "CP": the checkpoint topic
	key       *string
	headers   *string // jsonb text; nil: NULL
	partition *int32
	reason    string // "" when the row is publishable
}

func strp(s string) *string { return &s }

// TestEveryUnpublishableRowIsDeadLetteredWithItsReason sweeps the outbox
// row's columns for values Kafka cannot take (topic, key, headers,
// partition, size): each such row is dead-lettered with a reason naming the
// column, and the rows after it in the same batch, of other keys, are
// published, in every delivery mode. Values that look odd but Kafka takes
// (an empty header name, NUL bytes in a key, an empty key in a compacted
// topic) are published intact. A NUL in a header value cannot reach the
// relay: PostgreSQL's jsonb refuses \u0000 at insert.
func TestEveryUnpublishableRowIsDeadLetteredWithItsReason(t *testing.T) {
	manyHeaders := func() string { // 80,000 headers: 1.4 MB as JSON text, more than a record
		var b strings.Builder
		b.WriteString("{")
		for i := range 80000 {
			if i > 0 {
				b.WriteString(", ")
			}
			fmt.Fprintf(&b, `"h%d": "v"`, i)
		}
		b.WriteString("}")
		return b.String()
	}()
	p := func(n int32) *int32 { return &n }
	raw := make([]byte, 1500)
	rand.Read(raw)
	longTopic := hex.EncodeToString(raw)
	raw = make([]byte, 2<<20)
	rand.Read(raw)
	hugeTopic := hex.EncodeToString(raw)
	cases := []badRowCase{
		{name: "empty topic", topic: "", reason: "column topic: topic is empty"},
		{name: "topic .", topic: ".", reason: `column topic: topic "." is not allowed`},
		{name: "topic ..", topic: "..", reason: `column topic: topic ".." is not allowed`},
		{name: "topic of 1,000 characters", topic: strings.Repeat("t", 1000), reason: "is 1000 characters: Kafka allows 249"},
		{name: "topic of 250 characters", topic: strings.Repeat("t", 250), reason: "is 250 characters: Kafka allows 249"},
		// Random: PostgreSQL would compress a repetitive one to fit an index entry.
		{name: "topic of 3,000 characters with a key", topic: longTopic, reason: "is longer than 1024 characters: Kafka allows 249"},
		{name: "topic of 4 MiB with a key", topic: hugeTopic, reason: "is longer than 1024 characters: Kafka allows 249"},
		{name: "topic with a slash", topic: "orders/eu", reason: `has '/'`},
		{name: "topic with a space", topic: "orders eu", reason: `has ' '`},
		{name: "topic not ASCII", topic: "bestellungen-ä", reason: `has 'ä'`},
		{name: "Kafka's internal topic", topic: "__consumer_offsets", reason: `topic "__consumer_offsets" is internal to Kafka`},
		{name: "Kafka's transaction log", topic: "__transaction_state", reason: `topic "__transaction_state" is internal to Kafka`},
		{name: "the checkpoint topic", topic: "CP", reason: "the relay's checkpoint topic"},
		{name: "a topic that does not exist", topic: "no-such-topic-" + strings.ToLower(testenv.RandomName("")), reason: "does not exist"},
		{name: "keyless row in a compacted topic", topic: "C", key: nil, reason: "column key is NULL and topic"},
		{name: "headers an array", topic: "T", headers: strp(`["a", "b"]`), reason: "column headers is"},
		{name: "headers a string", topic: "T", headers: strp(`"a=b"`), reason: "must be a JSON object"},
		{name: "headers a number", topic: "T", headers: strp(`42`), reason: "must be a JSON object"},
		{name: "headers JSON null", topic: "T", headers: strp(`null`), reason: "must be a JSON object"},
		{name: "header value a number", topic: "T", headers: strp(`{"n": 1}`), reason: `value of "n" is a number, must be a string`},
		{name: "header value null", topic: "T", headers: strp(`{"n": null}`), reason: `value of "n" is null, must be a string`},
		{name: "header value an object", topic: "T", headers: strp(`{"n": {"a": "b"}}`), reason: `value of "n" is an object`},
		{name: "header value an array", topic: "T", headers: strp(`{"n": ["a"]}`), reason: `value of "n" is an array`},
		{name: "header value a boolean", topic: "T", headers: strp(`{"n": true}`), reason: `value of "n" is a boolean`},
		{name: "the reserved header", topic: "T", headers: strp(`{"Outbox-Id": "7"}`), reason: "reserved"},
		{name: "too many headers", topic: "T", headers: &manyHeaders, reason: "as JSON text), more than 1048576"},
		{name: "negative partition", topic: "T", partition: p(-1), reason: "column partition is -1"},
		{name: "partition the topic lacks", topic: "T", partition: p(7), reason: "partition 7 does not exist"},
		{name: "empty header name", topic: "T", headers: strp(`{"": "x"}`)},
		{name: "NUL bytes in the key", topic: "T", key: strp("a\x00b")},
		{name: "empty key in a compacted topic", topic: "C", key: strp("")},
	}
	for _, mode := range []string{"exactly-once", "at-least-once", "at-most-once"} {
		t.Run(mode, func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic, compacted := testenv.RandomName("sweep-"), testenv.RandomName("compacted-")
			k := testenv.NewKafka(t, 2, topic)
			k.CreateTopicsWithConfig(t, 2, map[string]*string{"cleanup.policy": strp("compact")}, compacted)
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = mode
			cfg.BatchSize = 500
			cases := cases
			if k.Real {
				// A real cluster may create a missing topic on request
				// (auto.create.topics.enable): TestBrokerAutoCreationIsHonoured.
				cases = slices.DeleteFunc(slices.Clone(cases), func(c badRowCase) bool { return c.name == "a topic that does not exist" })
			}

			if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, 'k', 'v', '{"a": "\u0000"}')`, topic); err == nil ||
				!strings.Contains(err.Error(), "unsupported Unicode escape sequence") {
				t.Errorf("a NUL in a header value: %v, want PostgreSQL to refuse it at insert", err)
			}
			// Each case, then a good row of its own key: one batch.
			tx, err := db.Pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var caseID = map[int64]badRowCase{}
			var good []int64
			for i, c := range cases {
				name := map[string]string{"T": topic, "C": compacted, "CP": cfg.CheckpointTopic}[c.topic]
				if name == "" {
					name = c.topic
				}
				var key []byte
				switch {
				case c.key != nil:
					key = []byte(*c.key)
				case c.topic != "C":
					key = []byte(fmt.Sprintf("bad-%d", i))
				}
				var id int64
				if err := tx.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers, partition) VALUES ($1, $2, $3, $4::jsonb, $5) RETURNING id`,
					name, key, "case "+c.name, c.headers, c.partition).Scan(&id); err != nil {
					t.Fatalf("%s: %v", c.name, err)
				}
				caseID[id] = c
				if c.reason == "" {
					good = append(good, id)
				}
				if err := tx.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, $2, 'good') RETURNING id`,
					topic, fmt.Sprintf("good-%d", i)).Scan(&id); err != nil {
					t.Fatal(err)
				}
				good = append(good, id)
			}
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))

			st := outbox.NewStore(db.Pool, db.Table)
			// Every row published or dead-lettered, then each case checked.
			faultsEventually(t, 60*time.Second, "no row is left unpublished", func() bool { return db.Unpublished(t) == 0 })
			dead := badRowsDeadLetters(t, st, 0)
			for id, c := range caseID {
				d, ok := dead[id]
				switch {
				case c.reason == "" && ok:
					t.Errorf("%s (row %d): dead-lettered (%.200s), want it published", c.name, id, d.Error)
				case c.reason != "" && !ok:
					t.Errorf("%s (row %d): not dead-lettered, want a reason with %q", c.name, id, c.reason)
				case c.reason != "" && !strings.Contains(d.Error, c.reason):
					t.Errorf("%s (row %d): reason %.300q, want %q in it", c.name, id, d.Error, c.reason)
				}
			}
			seen := k.NewConsumer(t, topic, compacted).WaitFor(t, len(good), 30*time.Second)
			testenv.CheckExactlyOnce(t, good, seen)
			for _, s := range seen {
				if c, ok := caseID[s.ID]; ok && c.headers != nil {
					if v, ok := s.Headers[""]; !ok || v != "x" {
						t.Errorf("%s: headers %v, want the empty name with x", c.name, s.Headers)
					}
				}
			}
		})
	}
}
