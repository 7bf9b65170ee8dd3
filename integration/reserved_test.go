package integration

// The relay's own record header: outbox-id carries the row id, and a row may
// not set it.
//
// It runs against the in-process kfake cluster, or a real cluster when
// KAFKA_BROKERS is set: nothing here needs kfake's own controls.

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// TestRowOutboxIDHeaderIsReservedAndDeadLettered: a row whose headers
// column sets outbox-id would be published with two outbox-id headers, and
// consumers that read the last one (Java's lastHeader) would take it for
// another event. outbox-id is reserved: such a row is dead-lettered with an
// error naming the column and the fix; every record published carries
// exactly one outbox-id, its row's id.
func TestRowOutboxIDHeaderIsReservedAndDeadLettered(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	var good, bad []int64
	for i, headers := range []string{`{"type":"transfer"}`, `{"outbox-id":"42"}`, `{"type":"refund"}`, `{"type":"fee","outbox-id":"1"}`, ""} {
		var h *string // "": SQL NULL, no headers
		if headers != "" {
			h = &headers
		}
		var id int64
		if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, 'acct-1', $2, $3::jsonb) RETURNING id`,
			topic, []byte{byte('a' + i)}, h).Scan(&id); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(headers, txn.HeaderOutboxID) {
			bad = append(bad, id)
		} else {
			good = append(good, id)
		}
	}
	// Every row has the same key: under hold-key (the default) the first
	// dead letter would hold the rest; this test is about the header.
	cfg := testenv.RelayConfig(db, k)
	cfg.DeadLetterOrder = "skip"
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	faultsEventually(t, 30*time.Second, "every row published or dead-lettered", func() bool { return db.Unpublished(t) == 0 })

	dead, err := outbox.NewStore(db.Pool, db.Table).ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != len(bad) {
		// Not fatal: the records below show what the consumers got.
		t.Errorf("dead letters = %+v, want rows %v", dead, bad)
		dead = nil
	}
	for i, d := range dead {
		if d.ID != bad[i] {
			t.Errorf("dead letter %d is row %d, want row %d", i, d.ID, bad[i])
		}
		for _, frag := range []string{"column headers", `"outbox-id"`, "reserved", "rename"} {
			if !strings.Contains(d.Error, frag) {
				t.Errorf("dead letter %d error %q does not contain %q", d.ID, d.Error, frag)
			}
		}
	}
	recs := k.NewConsumer(t, topic).WaitFor(t, len(good), 15*time.Second)
	raw, err := faultsReadCommitted(k.Brokers, topic, len(good), 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range raw {
		n := 0
		for _, h := range r.Headers {
			if h.Key == txn.HeaderOutboxID {
				n++
			}
		}
		if n != 1 {
			t.Errorf("record at %s/%d@%d has %d %s headers, want 1", r.Topic, r.Partition, r.Offset, n, txn.HeaderOutboxID)
		}
	}
	testenv.CheckExactlyOnce(t, good, recs)
}
