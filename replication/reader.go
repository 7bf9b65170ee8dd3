package replication

import (
	"context"
	"errors"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// Limits bound one batch, the rows of one Kafka transaction.
type Limits struct {
	// Rows is the most rows in a batch (at least 1).
	Rows int
	// Bytes is the most key, value and header bytes in a batch; a single
	// row larger than it still makes a batch of its own.
	Bytes int
	// Linger is how long a batch that holds rows waits for more committed
	// transactions before it is handed out (0: hand out what has arrived).
	Linger time.Duration
	// Until, when not 0, is the last position to hand out: a transaction
	// ending after it is kept back, and the batch that reaches it says so
	// (Batch.Reached). A switch back to the poll read drains the slot to
	// the consistent point of a snapshot with it.
	Until LSN
}

// Batch is the content of one Kafka transaction: the rows of whole
// PostgreSQL transactions in commit order, and at its start or end a part
// of one transaction too large for a batch (C2).
type Batch struct {
	// Rows to publish, in order.
	Rows []outbox.Row
	// End is what the batch's checkpoint records: once the Kafka
	// transaction commits, Kafka holds everything up to End.
	End Position
	// Confirm is the position the slot may be confirmed to once the Kafka
	// transaction commits (C3): End's LSN, or for a part of a transaction
	// the start of its commit record, so the server sends it again.
	Confirm LSN
	// Reached says that everything up to Limits.Until has been handed
	// out (in this batch or before), and nothing after it.
	Reached bool
}

// Reader cuts a stream into batches. Cuts are deterministic: a transaction
// that does not fit the batch being filled starts the next one, and one
// larger than a batch is cut every Limits.Rows rows (or Limits.Bytes), so
// after a crash the parts after a checkpoint are the same parts (C1, C4).
type Reader struct {
	s      *Stream
	lim    Limits
	split  *Txn // a transaction handed out in parts, the rest still to go
	from   int  // split's first row not yet in a batch
	system Position
}

// NewReader returns a reader of s's transactions.
func NewReader(s *Stream, lim Limits) *Reader {
	if lim.Rows < 1 {
		lim.Rows = 1
	}
	sys, tli := s.System()
	return &Reader{s: s, lim: lim, system: Position{SystemID: sys, Timeline: tli}}
}

func rowBytes(r outbox.Row) int { return len(r.Key) + len(r.Value) + len(r.Headers) + len(r.Topic) }

// Next returns the next batch. A batch with no rows is an idle position:
// nothing is pending and the server has moved on; committing a checkpoint
// for it lets the slot release WAL while the outbox is idle.
func (r *Reader) Next(ctx context.Context) (Batch, error) {
	var b Batch
	bytes := 0
	room := func() (int, int) { return r.lim.Rows - len(b.Rows), r.lim.Bytes - bytes }
	// take adds t's rows from index from; it reports whether all of them fit.
	take := func(t *Txn, from int) bool {
		n := 0
		for _, row := range t.Rows[from:] {
			rows, by := room()
			sz := rowBytes(row)
			if rows == 0 || (r.lim.Bytes > 0 && sz > by && len(b.Rows) > 0) {
				break
			}
			b.Rows = append(b.Rows, row)
			bytes += sz
			n++
		}
		if from+n == len(t.Rows) {
			b.End = r.at(t.EndLSN, 0, 0)
			b.Confirm = t.EndLSN
			return true
		}
		b.End = r.at(t.EndLSN, t.CommitLSN, from+n)
		b.Confirm = t.CommitLSN
		r.split, r.from = t, from+n
		return false
	}
	if t := r.split; t != nil && r.lim.Until != 0 && t.EndLSN > r.lim.Until {
		return Batch{Reached: true}, nil
	}
	if t := r.split; t != nil {
		r.split = nil
		if !take(t, r.from) {
			return b, nil
		}
	}
	deadline := time.Time{}
	for {
		rctx, cancel := ctx, context.CancelFunc(func() {})
		if len(b.Rows) > 0 {
			if deadline.IsZero() {
				deadline = time.Now().Add(r.lim.Linger)
			}
			rctx, cancel = context.WithDeadline(ctx, deadline)
		}
		ev, err := r.s.Next(rctx)
		cancel()
		if err != nil {
			if len(b.Rows) > 0 && (pgconn.Timeout(err) || errors.Is(err, context.DeadlineExceeded) || ctx.Err() != nil) {
				// The linger ran out, or the caller's own deadline: the
				// transactions in b were handed out, so b goes out too.
				return b, nil
			}
			return Batch{}, err
		}
		if ev.Txn == nil {
			// Idle: everything handed out is in b or already committed.
			b.End = r.at(ev.Idle, 0, 0)
			b.Confirm = ev.Idle
			b.Reached = r.lim.Until != 0 && ev.Idle >= r.lim.Until
			return b, nil
		}
		t := ev.Txn
		if r.lim.Until != 0 && t.EndLSN > r.lim.Until {
			// Past the last position to hand out: kept back.
			r.split, r.from = t, t.Skip
			b.Reached = true
			return b, nil
		}
		rows, by := room()
		need := 0
		for _, row := range t.Rows[t.Skip:] {
			need += rowBytes(row)
		}
		fits := len(t.Rows)-t.Skip <= rows && (r.lim.Bytes <= 0 || need <= by)
		if len(b.Rows) > 0 && !fits {
			// It starts the next batch, so that its cuts do not depend on
			// what came before it.
			r.split, r.from = t, t.Skip
			return b, nil
		}
		if !take(t, t.Skip) {
			return b, nil
		}
		if len(b.Rows) >= r.lim.Rows {
			return b, nil
		}
	}
}

func (r *Reader) at(end, commit LSN, rowIndex int) Position {
	p := r.system
	p.EndLSN, p.CommitLSN, p.RowIndex = end, commit, rowIndex
	return p
}
