package replication_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/replication"
)

// logical is a private cluster at wal_level=logical with the outbox table
// migrated and a publication of its inserts.
type logical struct {
	pg   *testenv.PrivatePostgres
	url  string
	conn *pgx.Conn
	cfg  replication.Config
}

func startLogical(t *testing.T) *logical {
	t.Helper()
	pg := testenv.StartPrivatePostgres(t, "wal_level=logical", "max_replication_slots=8", "max_wal_senders=8", "wal_sender_timeout=60s")
	l := &logical{pg: pg, url: pg.URL("postgres", "postgres")}
	l.connect(t)
	m, err := migrations.New(l.conn, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := replication.EnsurePublication(context.Background(), l.conn, "outbox_pub", "public", "outbox"); err != nil {
		t.Fatal(err)
	}
	l.exec(t, `CREATE TABLE unrelated (id bigserial PRIMARY KEY, pad text)`)
	l.cfg = replication.Config{ConnString: l.url, Slot: "outbox_relay", Publication: "outbox_pub",
		Table: replication.Table{Schema: "public", Name: "outbox"}, StatusInterval: 200 * time.Millisecond}
	rc := l.replConn(t)
	if _, err := replication.CreateSlot(context.Background(), rc, l.cfg.Slot, false); err != nil {
		t.Fatal(err)
	}
	rc.Close(context.Background())
	return l
}

func (l *logical) connect(t *testing.T) {
	t.Helper()
	c, err := pgx.Connect(context.Background(), l.url)
	if err != nil {
		t.Fatal(err)
	}
	l.conn = c
	t.Cleanup(func() { c.Close(context.Background()) })
}

func (l *logical) replConn(t *testing.T) *pgconn.PgConn {
	t.Helper()
	c, err := pgconn.Connect(context.Background(), l.url+"?replication=database")
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func (l *logical) exec(t *testing.T, sql string, args ...any) {
	t.Helper()
	if _, err := l.conn.Exec(context.Background(), sql, args...); err != nil {
		t.Fatalf("%s: %v", sql, err)
	}
}

// insertTxn commits one transaction of n rows on topic and returns their ids.
func (l *logical) insertTxn(t *testing.T, topic string, n int) []int64 {
	t.Helper()
	var ids []int64
	rows, err := l.conn.Query(context.Background(),
		`INSERT INTO outbox (topic, key, value, headers) SELECT $1, convert_to('k' || g, 'UTF8'), convert_to('v' || g, 'UTF8'), '{"n":"1"}' FROM generate_series(1, $2) g RETURNING id`, topic, n)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return ids
}

func (l *logical) open(t *testing.T, from replication.Position) *replication.Stream {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := replication.Open(ctx, l.cfg, from)
	if err != nil {
		t.Fatalf("open at %s: %v", from.EndLSN, err)
	}
	t.Cleanup(func() { s.Close(context.Background()) })
	return s
}

// next returns the next committed transaction, skipping idle positions.
func next(t *testing.T, s *replication.Stream) *replication.Txn {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		ev, err := s.Next(ctx)
		if err != nil {
			t.Fatalf("next: %v", err)
		}
		if ev.Txn != nil {
			return ev.Txn
		}
	}
}

func ids(tx *replication.Txn) []int64 {
	var out []int64
	for _, r := range tx.Rows {
		out = append(out, r.ID)
	}
	return out
}

func TestStreamHandsOutWholeTransactionsInCommitOrder(t *testing.T) {
	l := startLogical(t)
	ctx := context.Background()
	// A opens first and commits last: commit order is B, C, A.
	other, err := pgx.Connect(ctx, l.url)
	if err != nil {
		t.Fatal(err)
	}
	defer other.Close(ctx)
	a, err := other.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var aIDs []int64
	for i := 0; i < 3; i++ {
		var id int64
		if err := a.QueryRow(ctx, `INSERT INTO outbox (topic, key, value) VALUES ('a', 'ka', $1) RETURNING id`, []byte(fmt.Sprintf("a%d", i))).Scan(&id); err != nil {
			t.Fatal(err)
		}
		aIDs = append(aIDs, id)
	}
	b := l.insertTxn(t, "b", 2)
	var cID int64
	// Every column the relay reads, NULLs and a partition included.
	if err := l.conn.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers, partition) VALUES ('c', NULL, NULL, NULL, 2) RETURNING id`).Scan(&cID); err != nil {
		t.Fatal(err)
	}
	if err := a.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	s := l.open(t, replication.Position{})
	tb, tc, ta := next(t, s), next(t, s), next(t, s)
	if got := fmt.Sprint(ids(tb), ids(tc), ids(ta)); got != fmt.Sprint(b, []int64{cID}, aIDs) {
		t.Fatalf("transactions in the stream: %s, want commit order %v %v %v", got, b, cID, aIDs)
	}
	if !(tb.EndLSN < tc.EndLSN && tc.EndLSN < ta.EndLSN) {
		t.Fatalf("end LSNs not increasing: %s %s %s", tb.EndLSN, tc.EndLSN, ta.EndLSN)
	}
	r := tb.Rows[0]
	if r.Topic != "b" || string(r.Key) != "k1" || string(r.Value) != "v1" || !bytes.Contains(r.Headers, []byte(`"n"`)) || r.Partition != nil || r.CreatedAt.IsZero() {
		t.Fatalf("row decoded as %+v", r)
	}
	c := tc.Rows[0]
	if c.Key != nil || c.Value != nil || c.Headers != nil || c.Partition == nil || *c.Partition != 2 {
		t.Fatalf("row with NULLs decoded as %+v", c)
	}
	if string(ta.Rows[2].Value) != "a2" {
		t.Fatalf("A's last row is %q", ta.Rows[2].Value)
	}
	var created time.Time
	var event string
	if err := l.conn.QueryRow(ctx, `SELECT created_at, event_id::text FROM outbox WHERE id = $1`, b[0]).Scan(&created, &event); err != nil {
		t.Fatal(err)
	}
	if !created.Equal(r.CreatedAt) {
		t.Fatalf("created_at %s in the stream, %s in the table", r.CreatedAt, created)
	}
	if r.EventID != event {
		t.Fatalf("event_id %q in the stream, %q in the table", r.EventID, event)
	}
}

// C4: a restart at a checkpoint's end LSN repeats nothing the checkpoint
// holds and skips nothing after it, even when the slot was confirmed only
// to an earlier position (the confirm had not reached the server), or to a
// commit's start LSN (the off-by-one the peers shipped).
func TestRestartAtACheckpointRepeatsAndSkipsNothing(t *testing.T) {
	l := startLogical(t)
	var want [][]int64
	for i := 0; i < 5; i++ {
		want = append(want, l.insertTxn(t, "t", 3))
	}
	s := l.open(t, replication.Position{})
	var got []*replication.Txn
	for i := 0; i < 5; i++ {
		got = append(got, next(t, s))
	}
	// Kafka holds transactions 0..2; only 0 reached the slot.
	s.Confirm(got[0].EndLSN)
	if err := s.Close(context.Background()); err != nil {
		t.Fatal(err)
	}
	sys, tli := s.System()
	s2 := l.open(t, replication.Position{SystemID: sys, Timeline: tli, EndLSN: got[2].EndLSN})
	if n := next(t, s2); fmt.Sprint(ids(n)) != fmt.Sprint(want[3]) {
		t.Fatalf("after a checkpoint at transaction 2's end the stream gave %v, want transaction 3 %v", ids(n), want[3])
	}
	s2.Close(context.Background())

	// The slot confirmed only to transaction 0, a checkpoint at 3's end:
	// 4 comes next (the server starts decoding at the position asked for,
	// and the stream skips anything ending at or before it).
	s3 := l.open(t, replication.Position{SystemID: sys, Timeline: tli, EndLSN: got[3].EndLSN})
	if n := next(t, s3); fmt.Sprint(ids(n)) != fmt.Sprint(want[4]) {
		t.Fatalf("after a checkpoint at transaction 3's end the stream gave %v, want transaction 4 %v", ids(n), want[4])
	}
}

// C3: the slot never moves past what the caller confirmed, and a slot found
// ahead of the checkpoint stops the stream (it would skip events).
func TestSlotAheadOfTheCheckpointStopsLoudly(t *testing.T) {
	l := startLogical(t)
	for i := 0; i < 3; i++ {
		l.insertTxn(t, "t", 2)
	}
	s := l.open(t, replication.Position{})
	t0, _, t2 := next(t, s), next(t, s), next(t, s)
	sys, tli := s.System()
	if err := s.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	rc := l.replConn(t)
	slot, err := replication.ReadSlot(context.Background(), rc, l.cfg.Slot)
	rc.Close(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if slot.ConfirmedFlush >= t0.EndLSN {
		t.Fatalf("slot confirmed to %s before anything was confirmed (first transaction ends %s)", slot.ConfirmedFlush, t0.EndLSN)
	}
	s.Confirm(t2.EndLSN)
	s.Close(context.Background())

	_, err = replication.Open(context.Background(), l.cfg, replication.Position{SystemID: sys, Timeline: tli, EndLSN: t0.EndLSN})
	if !errors.Is(err, replication.ErrHistory) {
		t.Fatalf("open with a checkpoint behind the slot: %v, want ErrHistory", err)
	}
	t.Logf("refused: %v", err)
	_, err = replication.Open(context.Background(), l.cfg, replication.Position{SystemID: "1234", Timeline: tli, EndLSN: t2.EndLSN})
	if !errors.Is(err, replication.ErrHistory) {
		t.Fatalf("open with another system's checkpoint: %v, want ErrHistory", err)
	}
	t.Logf("refused: %v", err)
}

// An idle outbox on a busy database must not pin WAL: the stream reports
// idle positions, and once confirmed, the slot's retained WAL falls back.
func TestIdleOutboxDoesNotPinWAL(t *testing.T) {
	l := startLogical(t)
	s := l.open(t, replication.Position{})
	ctx, cancel := context.WithTimeout(context.Background(), 40*time.Second)
	defer cancel()
	for i := 0; i < 20; i++ {
		l.exec(t, `INSERT INTO unrelated (pad) SELECT repeat('x', 1000) FROM generate_series(1, 2000)`)
	}
	l.exec(t, `SELECT pg_switch_wal()`)
	var current pglogrepl.LSN
	var s2 string
	if err := l.conn.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&s2); err != nil {
		t.Fatal(err)
	}
	current, _ = pglogrepl.ParseLSN(s2)
	for {
		ev, err := s.Next(ctx)
		if err != nil {
			t.Fatalf("next: %v", err)
		}
		if ev.Txn != nil {
			t.Fatalf("a transaction of another table reached the stream: %v", ids(ev.Txn))
		}
		s.Confirm(ev.Idle)
		if ev.Idle >= current {
			break
		}
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	var retained int64
	deadline := time.Now().Add(10 * time.Second)
	for {
		if err := l.conn.QueryRow(ctx, `SELECT pg_current_wal_lsn() - confirmed_flush_lsn FROM pg_replication_slots WHERE slot_name = $1`, l.cfg.Slot).Scan(&retained); err != nil {
			t.Fatal(err)
		}
		if retained < 1<<20 || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if retained >= 1<<20 {
		t.Fatalf("the slot still holds %d bytes of WAL behind the server's position after the idle positions were confirmed", retained)
	}
}

// C10: a column the relay needs dropped mid-stream stops the stream; a
// column added is harmless.
func TestSchemaChangesMidStream(t *testing.T) {
	l := startLogical(t)
	first := l.insertTxn(t, "t", 1)
	l.exec(t, `ALTER TABLE outbox ADD COLUMN extra text DEFAULT 'x'`)
	second := l.insertTxn(t, "t", 1)
	l.exec(t, `ALTER TABLE outbox DROP COLUMN partition`)
	l.insertTxn(t, "t", 1)
	s := l.open(t, replication.Position{})
	if got := ids(next(t, s)); fmt.Sprint(got) != fmt.Sprint(first) {
		t.Fatalf("first: %v want %v", got, first)
	}
	if got := ids(next(t, s)); fmt.Sprint(got) != fmt.Sprint(second) {
		t.Fatalf("after ADD COLUMN: %v want %v", got, second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		ev, err := s.Next(ctx)
		if err != nil {
			if !errors.Is(err, replication.ErrSchema) {
				t.Fatalf("after DROP COLUMN partition: %v, want ErrSchema", err)
			}
			t.Logf("stopped: %v", err)
			return
		}
		if ev.Txn != nil {
			t.Fatalf("a row without the partition column was handed out: %v", ids(ev.Txn))
		}
	}
}

// A PostgreSQL crash after a confirm can move the slot's confirmed position
// back (it is saved at checkpoints): starting at the checkpoint's position
// repeats nothing.
func TestCrashRestartAfterAConfirmRepeatsNothing(t *testing.T) {
	l := startLogical(t)
	var want [][]int64
	for i := 0; i < 4; i++ {
		want = append(want, l.insertTxn(t, "t", 2))
	}
	s := l.open(t, replication.Position{})
	var got []*replication.Txn
	for i := 0; i < 3; i++ {
		got = append(got, next(t, s))
	}
	s.Confirm(got[2].EndLSN)
	if err := s.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	sys, tli := s.System()
	l.pg.Crash()
	l.pg.Start()
	l.connect(t)
	s2 := l.open(t, replication.Position{SystemID: sys, Timeline: tli, EndLSN: got[2].EndLSN})
	if n := next(t, s2); fmt.Sprint(ids(n)) != fmt.Sprint(want[3]) {
		t.Fatalf("after a crash-restart the stream gave %v, want %v", ids(n), want[3])
	}
}

func nextBatch(t *testing.T, r *replication.Reader) replication.Batch {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	for {
		b, err := r.Next(ctx)
		if err != nil {
			t.Fatalf("next batch: %v", err)
		}
		if len(b.Rows) > 0 {
			return b
		}
	}
}

func rowIDs(b replication.Batch) []int64 {
	var out []int64
	for _, r := range b.Rows {
		out = append(out, r.ID)
	}
	return out
}

// C1/C4 for a transaction larger than a batch: it is cut at the same rows
// every time, and a restart at a checkpoint of one part goes on with the
// next part: no row twice, none skipped.
func TestATransactionLargerThanABatchIsCutDeterministically(t *testing.T) {
	l := startLogical(t)
	small := l.insertTxn(t, "t", 3)
	big := l.insertTxn(t, "t", 25)
	after := l.insertTxn(t, "t", 2)
	lim := replication.Limits{Rows: 10, Linger: 200 * time.Millisecond}
	s := l.open(t, replication.Position{})
	r := replication.NewReader(s, lim)
	b1 := nextBatch(t, r)
	if fmt.Sprint(rowIDs(b1)) != fmt.Sprint(small) {
		t.Fatalf("first batch %v, want the small transaction %v alone (the big one starts the next batch)", rowIDs(b1), small)
	}
	b2 := nextBatch(t, r)
	if fmt.Sprint(rowIDs(b2)) != fmt.Sprint(big[:10]) || b2.End.RowIndex != 10 {
		t.Fatalf("second batch %v at %+v, want %v at row index 10", rowIDs(b2), b2.End, big[:10])
	}
	b3 := nextBatch(t, r)
	if fmt.Sprint(rowIDs(b3)) != fmt.Sprint(big[10:20]) || b3.End.RowIndex != 20 {
		t.Fatalf("third batch %v at %+v, want %v at row index 20", rowIDs(b3), b3.End, big[10:20])
	}
	// Kafka committed b2 only; the relay dies.
	s.Confirm(b2.Confirm)
	s.Close(context.Background())

	s2 := l.open(t, b2.End)
	r2 := replication.NewReader(s2, lim)
	c3 := nextBatch(t, r2)
	if fmt.Sprint(rowIDs(c3)) != fmt.Sprint(rowIDs(b3)) || c3.End != b3.End {
		t.Fatalf("after a restart at %+v the batch is %v at %+v, want the same part as before %v at %+v", b2.End, rowIDs(c3), c3.End, rowIDs(b3), b3.End)
	}
	c4 := nextBatch(t, r2)
	want := append(append([]int64{}, big[20:]...), after...)
	if fmt.Sprint(rowIDs(c4)) != fmt.Sprint(want) || c4.End.RowIndex != 0 {
		t.Fatalf("last batch %v at %+v, want the big transaction's rest and the next one %v", rowIDs(c4), c4.End, want)
	}
}

func TestEnsurePublicationRefusesOneThatIsNotTheRelays(t *testing.T) {
	l := startLogical(t)
	ctx := context.Background()
	if err := replication.EnsurePublication(ctx, l.conn, "outbox_pub", "public", "outbox"); err != nil {
		t.Fatalf("the relay's own publication, again: %v", err)
	}
	l.exec(t, `CREATE PUBLICATION everything FOR ALL TABLES`)
	err := replication.EnsurePublication(ctx, l.conn, "everything", "public", "outbox")
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_REPLICATION_PUBLICATION") {
		t.Fatalf("a publication of all tables: %v, want a refusal naming OUTBOX_REPLICATION_PUBLICATION", err)
	}
	if got := replication.DefaultSlot("My-DB", "public", "outbox"); got != "my_db_public_outbox_relay" {
		t.Fatalf("default slot name %q", got)
	}
}

// The slot is a lock: a second reader is refused while the first holds it,
// and a take-over ends the holder's walsender (its stream then fails) and
// reads on from the checkpoint.
func TestASecondReaderIsRefusedUntilItTakesTheSlotOver(t *testing.T) {
	l := startLogical(t)
	first := l.insertTxn(t, "t", 2)
	old := l.open(t, replication.Position{})
	t0 := next(t, old)
	if fmt.Sprint(ids(t0)) != fmt.Sprint(first) {
		t.Fatalf("first reader got %v", ids(t0))
	}
	sys, tli := old.System()
	from := replication.Position{SystemID: sys, Timeline: tli, EndLSN: t0.EndLSN}
	_, err := replication.Open(context.Background(), l.cfg, from)
	if !errors.Is(err, replication.ErrSlotBusy) {
		t.Fatalf("second reader while the first holds the slot: %v, want ErrSlotBusy", err)
	}
	rc := l.replConn(t)
	defer rc.Close(context.Background())
	if err := replication.TakeOver(context.Background(), rc, l.cfg.Slot, 10*time.Second); err != nil {
		t.Fatal(err)
	}
	second := l.insertTxn(t, "t", 1)
	s2 := l.open(t, from)
	if got := ids(next(t, s2)); fmt.Sprint(got) != fmt.Sprint(second) {
		t.Fatalf("after the take-over: %v, want %v", got, second)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for {
		_, err := old.Next(ctx)
		if err != nil {
			if !replication.Lost(err) {
				t.Fatalf("the old reader's error %v does not say the stream is lost", err)
			}
			break
		}
	}
}
