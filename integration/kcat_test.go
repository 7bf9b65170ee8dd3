package integration

import (
	"bufio"
	"context"
	"fmt"
	"maps"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestKcatAgreesWithGoConsumer checks the relay's output with clients that
// share no code with it: Debian's kcat (librdkafka) and, when installed,
// confluent_kafka for Python, both reading with
// isolation.level=read_committed. Each must see every outbox row exactly once,
// on the same partition and offset as the Go consumer, with its key, headers
// and tombstones (NULL values) as the outbox table holds them.
func TestKcatAgreesWithGoConsumer(t *testing.T) {
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		t.Fatalf("kcat is not on PATH: install it with `apt-get install kcat` (.ci/run installs it): %v", err)
	}
	db := testenv.NewDB(t)
	topic := testenv.RandomName("ledger-")
	k := testenv.NewKafka(t, 3, topic)

	// 200 rows in one transaction (COPY) and 50 small transactions of 2
	// rows (INSERT): keyed and keyless rows, rows with and without headers,
	// and tombstones.
	ctx := context.Background()
	keys := loadKeys(7)
	msg := func(i int) outbox.Message {
		m := outbox.Message{Topic: topic, Value: fmt.Appendf(nil, `{"n":%d}`, i)}
		if i%5 != 4 {
			m.Key = []byte(keys[i%len(keys)])
		}
		if i%3 == 0 {
			m.Headers = map[string]string{"trace-id": fmt.Sprintf("t-%d", i), "kind": "transfer"}
		}
		if i%41 == 7 {
			m.Value = nil // a tombstone of a keyed row
		}
		return m
	}
	var bulk []outbox.Message
	for i := range 200 {
		bulk = append(bulk, msg(i))
	}
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, bulk) }); err != nil {
		t.Fatal(err)
	}
	for i := 200; i < 300; i += 2 {
		if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.Write(ctx, tx, msg(i), msg(i+1)) }); err != nil {
			t.Fatal(err)
		}
	}
	want := outboxRows(t, db)
	tombstones := 0
	for _, r := range want {
		if r.tombstone {
			tombstones++
		}
	}
	if len(want) != 300 || tombstones == 0 {
		t.Fatalf("the outbox holds %d rows with %d tombstones, want 300 rows and some tombstones", len(want), tombstones)
	}

	cfg := testenv.RelayConfig(db, k)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	ids := make([]int64, 0, len(want))
	for id := range want {
		ids = append(ids, id)
	}
	seen := k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	goRecs := map[int64]clientRecord{}
	for _, s := range seen {
		goRecs[s.ID] = clientRecord{partition: s.Partition, offset: s.Offset, key: s.Key, tombstone: s.Value == nil, headers: s.Headers}
	}
	checkRecords(t, "the Go consumer", want, goRecs, nil)

	// kcat: one line per record, tab-separated; the key, which may hold
	// anything, comes last. %K and %S are -1 for a NULL key and value; %h
	// is the headers as name=value, comma-separated.
	cctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(cctx, kcat, "-C", "-q", "-e", "-o", "beginning",
		"-b", strings.Join(k.Brokers, ","), "-t", topic,
		"-X", "isolation.level=read_committed",
		"-f", "%p\t%o\t%S\t%K\t%h\t%k\n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, stderr.String())
	}
	kcatRecs := map[int64]clientRecord{}
	var dups []int64
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	for sc.Scan() {
		r, id, err := parseKcatLine(sc.Text())
		if err != nil {
			t.Fatalf("kcat printed %q: %v", sc.Text(), err)
		}
		if _, ok := kcatRecs[id]; ok {
			dups = append(dups, id)
		}
		kcatRecs[id] = r
	}
	if len(dups) > 0 {
		t.Fatalf("kcat saw ids %v more than once", dups)
	}
	checkRecords(t, "kcat", want, kcatRecs, goRecs)
	t.Logf("kcat and the Go consumer agree on %d records (%d tombstones), each once", len(kcatRecs), tombstones)

	t.Run("confluent_kafka", func(t *testing.T) {
		python := pythonWithConfluentKafka()
		if python == "" {
			t.Skip("python3 module confluent_kafka is not importable (Debian: apt-get install python3-confluent-kafka); kcat covered librdkafka")
		}
		cmd := exec.CommandContext(cctx, python, "-c", confluentReadScript, strings.Join(k.Brokers, ","), topic)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s confluent_kafka reader: %v\n%s", python, err, stderr.String())
		}
		pyRecs := map[int64]clientRecord{}
		var dups []int64
		for line := range strings.Lines(string(out)) {
			f := strings.Fields(line)
			if len(f) != 4 {
				t.Fatalf("confluent_kafka reader printed %q", line)
			}
			id, err1 := strconv.ParseInt(f[0], 10, 64)
			p, err2 := strconv.ParseInt(f[1], 10, 32)
			o, err3 := strconv.ParseInt(f[2], 10, 64)
			if err1 != nil || err2 != nil || err3 != nil {
				t.Fatalf("confluent_kafka reader printed %q", line)
			}
			if _, ok := pyRecs[id]; ok {
				dups = append(dups, id)
			}
			pyRecs[id] = clientRecord{partition: int32(p), offset: o, tombstone: f[3] == "null"}
		}
		if len(dups) > 0 {
			t.Fatalf("confluent_kafka saw ids %v more than once", dups)
		}
		for id, r := range pyRecs {
			g, ok := goRecs[id]
			switch {
			case !ok:
				t.Errorf("confluent_kafka saw id %d, the Go consumer did not", id)
			case g.partition != r.partition || g.offset != r.offset || g.tombstone != r.tombstone:
				t.Errorf("id %d: confluent_kafka saw partition %d offset %d tombstone %v, the Go consumer partition %d offset %d tombstone %v",
					id, r.partition, r.offset, r.tombstone, g.partition, g.offset, g.tombstone)
			}
		}
		if len(pyRecs) != len(goRecs) {
			t.Errorf("confluent_kafka saw %d records, the Go consumer %d", len(pyRecs), len(goRecs))
		}
		t.Logf("confluent_kafka (%s) agrees on %d records", python, len(pyRecs))
	})
}

// wantRow is an outbox row as the table holds it.
type wantRow struct {
	key       []byte
	tombstone bool
	headers   map[string]string
	eventID   string // the row's event_id, which the relay sends as outbox-event-id
}

func outboxRows(t *testing.T, db *testenv.DB) map[int64]wantRow {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), `SELECT id, key, value IS NULL, coalesce(headers, '{}')::jsonb, event_id::text FROM outbox`)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int64]wantRow{}
	var (
		id int64
		r  wantRow
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &r.key, &r.tombstone, &r.headers, &r.eventID}, func() error {
		out[id] = r
		r = wantRow{}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// clientRecord is one record as a consumer printed it.
type clientRecord struct {
	partition int32
	offset    int64
	key       []byte // nil: a NULL key
	tombstone bool
	headers   map[string]string
}

// parseKcatLine parses one line of kcat -f '%p\t%o\t%S\t%K\t%h\t%k\n'.
func parseKcatLine(line string) (clientRecord, int64, error) {
	f := strings.SplitN(line, "\t", 6)
	if len(f) != 6 {
		return clientRecord{}, 0, fmt.Errorf("want 6 tab-separated fields, got %d", len(f))
	}
	p, err1 := strconv.ParseInt(f[0], 10, 32)
	o, err2 := strconv.ParseInt(f[1], 10, 64)
	vlen, err3 := strconv.Atoi(f[2])
	klen, err4 := strconv.Atoi(f[3])
	for _, err := range []error{err1, err2, err3, err4} {
		if err != nil {
			return clientRecord{}, 0, err
		}
	}
	r := clientRecord{partition: int32(p), offset: o, tombstone: vlen == -1, headers: map[string]string{}}
	if klen >= 0 {
		r.key = []byte(f[5])
	}
	if f[4] != "" {
		for h := range strings.SplitSeq(f[4], ",") {
			name, value, ok := strings.Cut(h, "=")
			if !ok {
				return clientRecord{}, 0, fmt.Errorf("header %q is not name=value", h)
			}
			r.headers[name] = value
		}
	}
	id, err := strconv.ParseInt(r.headers["outbox-id"], 10, 64)
	if err != nil {
		return clientRecord{}, 0, fmt.Errorf("header outbox-id: %w", err)
	}
	return r, id, nil
}

// checkRecords fails the test unless got holds exactly the rows of want, each
// with its key, tombstone and headers (the row's, plus outbox-id and
// outbox-event-id), and, when
// ref is given, on the partition and offset where ref saw it.
func checkRecords(t *testing.T, who string, want map[int64]wantRow, got, ref map[int64]clientRecord) {
	t.Helper()
	bad := 0
	report := func(format string, a ...any) {
		if bad++; bad <= 20 {
			t.Errorf(who+": "+format, a...)
		}
	}
	for id, w := range want {
		g, ok := got[id]
		if !ok {
			report("id %d missing", id)
			continue
		}
		wh := maps.Clone(w.headers)
		wh["outbox-id"] = strconv.FormatInt(id, 10)
		wh["outbox-event-id"] = w.eventID
		switch {
		case (g.key == nil) != (w.key == nil) || string(g.key) != string(w.key):
			report("id %d: key %q (null %v), the table has %q (null %v)", id, g.key, g.key == nil, w.key, w.key == nil)
		case g.tombstone != w.tombstone:
			report("id %d: tombstone %v, the table has a NULL value: %v", id, g.tombstone, w.tombstone)
		case !maps.Equal(g.headers, wh):
			report("id %d: headers %v, want %v", id, g.headers, wh)
		}
		if r, ok := ref[id]; ok && (r.partition != g.partition || r.offset != g.offset) {
			report("id %d at partition %d offset %d, the Go consumer saw it at partition %d offset %d", id, g.partition, g.offset, r.partition, r.offset)
		}
	}
	for id := range got {
		if _, ok := want[id]; !ok {
			report("id %d is not an outbox row", id)
		}
	}
	if bad > 20 {
		t.Errorf("%s: %d problems in all", who, bad)
	}
}

// pythonWithConfluentKafka returns a python3 that can import confluent_kafka:
// the one on PATH, else Debian's /usr/bin/python3 (python3-confluent-kafka
// installs there, beside a pyenv or venv python on PATH), or "".
func pythonWithConfluentKafka() string {
	var candidates []string
	if p, err := exec.LookPath("python3"); err == nil {
		candidates = append(candidates, p)
	}
	candidates = append(candidates, "/usr/bin/python3")
	for _, p := range candidates {
		if exec.Command(p, "-c", "import confluent_kafka").Run() == nil {
			return p
		}
	}
	return ""
}

// confluentReadScript reads every partition of a topic from the beginning to
// its end with read_committed and prints "outbox-id partition offset
// null|value" per record.
const confluentReadScript = `
import sys, time
from confluent_kafka import Consumer, KafkaError, TopicPartition, OFFSET_BEGINNING

brokers, topic = sys.argv[1], sys.argv[2]
c = Consumer({
    "bootstrap.servers": brokers,
    "group.id": "outbox-relay-kcat-test",
    "isolation.level": "read_committed",
    "enable.auto.commit": False,
    "enable.partition.eof": True,
})
md = c.list_topics(topic, timeout=30)
t = md.topics[topic]
if t.error is not None:
    sys.exit("topic %s: %s" % (topic, t.error))
parts = sorted(t.partitions)
c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
at_end, deadline = set(), time.time() + 60
while len(at_end) < len(parts):
    if time.time() > deadline:
        sys.exit("timed out; at the end of partitions %s of %s" % (sorted(at_end), parts))
    m = c.poll(1.0)
    if m is None:
        continue
    if m.error():
        if m.error().code() == KafkaError._PARTITION_EOF:
            at_end.add(m.partition())
            continue
        sys.exit(str(m.error()))
    h = dict(m.headers() or [])
    print(h.get("outbox-id", b"").decode(), m.partition(), m.offset(), "null" if m.value() is None else "value")
c.close()
`
