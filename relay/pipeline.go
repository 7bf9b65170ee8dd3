package relay

import (
	"context"
	"encoding/binary"
	"errors"
	"log/slog"
	"slices"
	"time"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
)

// FailBeforeMarkPrevious: batch n committed, and its mark, pipelined, not yet
// begun; batch n+1 is being read and published meanwhile. Called from the
// goroutine that marks batch n, with batch n's ids. An error there stops
// the relay as soon as batch n+1's transaction has ended (committed or not),
// before batch n+1's mark: the relay dies with two committed batches
// unmarked, which recovery must mark from the checkpoint window (I2).
const FailBeforeMarkPrevious = "before-mark-previous"

// FailAfterReadAhead: batch n committed, its mark pending, and batch n+1,
// read while batch n's transaction ran, taken as the next batch and not yet
// published. Called with batch n+1's ids. An error stops the relay there.
const FailAfterReadAhead = "after-read-ahead"

// WithSerialLoop turns the pipelined publish loop off: every batch is marked
// before the next one is read, as before the pipeline (benchmarks and tests
// only: it measures what the pipeline buys).
func WithSerialLoop() Option { return func(r *Relay) { r.serial = true } }

// maxFloored bounds how many reads in a row a shard makes while a mark is
// in flight (reads that leave out the ids of the batches in flight, see
// pipeline.inflight); after maxFloored of them, or after any short batch,
// the loop waits for the mark and reads plainly from the start of the
// unpublished rows again. A read in flight does not skip a row below the
// batches in flight that became readable late (a late commit, `dlq
// discard`, `dlq requeue`): reading only above the last id in flight did,
// and the later rows of the row's key overtook it (I4;
// TestDiscardDuringTheReadAheadPublishesTheReleasedKeyInIDOrder,
// TestRowCommittedLateIsNotOvertakenByItsKey).
const maxFloored = 32

// pipeline is the state of one shard's pipelined publish loop. Three
// batches are in the air at once: batch n-1's mark, running while batch n's
// transaction runs, and batch n+1's read (the read-ahead), running while
// batch n's transaction commits. It belongs to the shard's worker
// goroutine alone (the goroutines it starts write only their own results).
type pipeline struct {
	pending *pendingMark
	ahead   *readAhead
	// last is the ids of the last batch read: with the pending mark's ids,
	// the rows a read must leave out (see inflight). A read leaves them out
	// by id, not by reading above the last of them: a row below them that
	// became readable since (committed late by a writer that took its id
	// early, released by `dlq discard`, put back at its id by `dlq requeue`)
	// must be read before the later rows of its key (I4).
	last    []int64
	floored int  // reads leaving rows in flight out since the last plain read
	short   bool // the last read found fewer rows than a batch
	// deadLettered counts the dead-letter moves of the loop: a read-ahead
	// that began before one is not used (see readAhead).
	deadLettered int
}

// readAhead is the read of batch n+1, leaving out the rows in flight
// (pipeline.inflight), started once Kafka acknowledged every record of
// batch n (txn.Producer.Publish's sent) and running while batch n commits
// and batch n-1's mark is settled. It starts no earlier so that the relay
// holds one batch's values at a time: batch n's are let go when it starts.
//
// It is used only as the read that would have followed: after batch n's
// transaction committed (else the loop ends and it is dropped), and only if
// no row was moved to the dead-letter table since it began. A dead letter
// of batch n (a record Kafka refused inside the transaction) holds the later
// rows of its key (hold-key), and a read that began before it was committed
// may hold rows of that key: I4 forbids publishing them, so such a
// read-ahead is dropped and the batch read again, with the hold in force.
type readAhead struct {
	rows         []outbox.Row
	err          error
	deadLettered int // pipeline.deadLettered when it began
	done         chan struct{}
	cancel       context.CancelFunc
}

// wait waits for the read to end and returns its rows.
func (ra *readAhead) wait() ([]outbox.Row, error) {
	<-ra.done
	ra.cancel()
	return ra.rows, ra.err
}

// startReadAhead starts reading the batch after the one whose records Kafka
// just acknowledged, leaving out the rows in flight (pl.inflight), unless the
// next read is to settle the mark and read from the start (a short batch, or
// maxFloored reads in a row: see readBatch). The read outlives the batch's
// context but not the database budget; endPipeline or the next readBatch
// waits for it.
func (r *Relay) startReadAhead(ctx context.Context, s int32, l *lease) {
	pl := l.pipe
	if pl == nil || pl.ahead != nil || pl.short || pl.floored >= maxFloored {
		return
	}
	actx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.dbBudget())
	ra := &readAhead{deadLettered: pl.deadLettered, done: make(chan struct{}), cancel: cancel}
	skip := pl.inflight()
	go func() {
		defer close(ra.done)
		ra.rows, ra.err = r.read(actx, s, l, skip)
	}()
	pl.ahead = ra
}

// takeReadAhead returns the read-ahead's rows when it may stand for the
// next read (see readAhead), and ok false otherwise (none, failed, or begun
// before a dead letter): the caller then reads.
func (pl *pipeline) takeReadAhead() (rows []outbox.Row, ok bool) {
	ra := pl.ahead
	if ra == nil {
		return nil, false
	}
	pl.ahead = nil
	rows, err := ra.wait()
	return rows, err == nil && ra.deadLettered == pl.deadLettered
}

// dropReadAhead waits for a read-ahead in flight and forgets it.
func (pl *pipeline) dropReadAhead() {
	if pl.ahead != nil {
		pl.ahead.cancel()
		pl.ahead.wait() //nolint:errcheck // dropped: its rows are read again
		pl.ahead = nil
	}
}

// pendingMark is a mark running in its own goroutine.
type pendingMark struct {
	ids     []int64
	created []time.Time
	observe func() // called once the mark is durable
	done    chan struct{}
	err     error // set before done is closed
	cancel  context.CancelFunc
}

// wait waits for the mark to end; it ends within the database budget it was
// started with.
func (pm *pendingMark) wait() error {
	<-pm.done
	pm.cancel()
	return pm.err
}

// pipelined reports whether the shard's loop marks batch n while batch n+1
// is read and published. Only in exactly-once mode, and only when every
// checkpoint is sure to list the previous batch as well as its own (I2: it
// lists every row committed and not yet durably marked, and with the mark of
// batch n in flight that is batch n too): the recovery window holds at least
// two batches (OUTBOX_RECOVERY_WINDOW >= 2), and two batches of the largest
// size fit the window's byte bound however their ids and times encode, so
// that Window.With never trims the batch whose mark is in flight.
func (r *Relay) pipelined() bool {
	return !r.serial && r.mode.Transactional() && r.cfg.RecoveryWindow >= 2 &&
		2*maxEncodedBatch(r.cfg.BatchSize) <= r.windowBytes()
}

// maxEncodedBatch is the most bytes a batch of n rows takes in the recovery
// window: its count, and per row two varints.
func maxEncodedBatch(n int) int { return binary.MaxVarintLen64 * (1 + 2*n) }

// readBatch reads the shard's next batch. With a mark in flight it reads
// without the rows in flight (I4: never a row of a batch not yet durably
// marked, and in id order); after a short batch, or maxFloored such reads, it
// first waits for the mark and reads from the start.
func (r *Relay) readBatch(ctx context.Context, s int32, l *lease, pl *pipeline, log *slog.Logger) ([]outbox.Row, error) {
	if pl != nil && pl.ahead != nil {
		l.step(r.dbBudget())
		if rows, ok := pl.takeReadAhead(); ok {
			// The read that follows a full batch, done while that
			// batch's transaction ran.
			if err := r.failpoint(ctx, FailAfterReadAhead, s, rowIDs(rows)); err != nil {
				return nil, err
			}
			pl.floored++
			pl.short = len(rows) < r.cfg.BatchSize
			pl.last = rowIDs(rows)
			return rows, nil
		}
	}
	if pl != nil && pl.pending != nil && (pl.short || pl.floored >= maxFloored) {
		if err := r.settleMark(ctx, s, l, pl, log); err != nil {
			return nil, err
		}
	}
	l.step(r.dbBudget())
	var rows []outbox.Row
	var err error
	if pl != nil && pl.pending != nil {
		pl.floored++
		rows, err = r.read(ctx, s, l, pl.inflight())
	} else {
		if pl != nil {
			pl.floored = 0
		}
		rows, err = r.read(ctx, s, l, nil)
	}
	if err != nil || pl == nil {
		return rows, err
	}
	pl.short = len(rows) < r.cfg.BatchSize
	pl.last = rowIDs(rows)
	return rows, nil
}

// inflight is the ids of the rows read and not yet durably settled: the
// last batch read (in its transaction, or committed) and the batch whose
// mark is pending. A read while they are in flight leaves them out.
func (pl *pipeline) inflight() []int64 {
	if pl.pending == nil {
		return pl.last
	}
	return append(slices.Clone(pl.pending.ids), pl.last...)
}

// read reads the shard's unpublished rows but those in skip (the rows in
// flight). Rows about to be published are read durably (Store.ReadDurable):
// the read also makes every commit it saw durable, so no row of a commit a
// database crash could still lose is published. At-most-once marks its rows
// before producing them, and that mark's commit is the flush.
func (r *Relay) read(ctx context.Context, s int32, l *lease, skip []int64) ([]outbox.Row, error) {
	if r.mode == txn.AtMostOnce {
		// Never pipelined: nothing in flight to skip.
		return r.store.ReadBatch(ctx, int(s), r.cfg.Shards, r.cfg.BatchSize, r.cfg.readMaxBytes())
	}
	return r.store.ReadDurable(ctx, l.Lease, r.cfg.Shards, r.cfg.BatchSize, r.cfg.readMaxBytes(), skip)
}

// markBatch marks a committed batch published. In the serial loop it marks
// it now. In the pipelined loop it first settles the mark of the previous
// batch, which ran while this batch's transaction did, and then starts this
// batch's mark, to run while the next batch is read and published.
//
// I1: called only after the transaction holding the rows committed.
// I2: while this batch's mark is in flight, the next transaction's
// checkpoint lists this batch (pipelined requires a window of two batches
// that byte trimming keeps); the window "committed, mark in flight" is closed
// by recovery marking the checkpoint window after any error. A mark that
// failed or lost the lease is found here, before the next batch's mark
// starts and before the next read can rely on it: the error stops the loop,
// and recovery re-marks from the newest checkpoint, which lists both
// batches.
//
// observe is called once the mark is durable.
func (r *Relay) markBatch(ctx context.Context, s int32, l *lease, ids []int64, created []time.Time, observe func(), log *slog.Logger) error {
	pl := l.pipe
	if pl == nil {
		// Marked by id and creation time, as recovery marks them.
		if _, err := r.markRetrying(ctx, l, len(ids), log, func(ctx context.Context) (int64, error) {
			return r.store.MarkCommitted(ctx, l.Lease, ids, created)
		}); err != nil {
			return err
		}
		if err := r.failpoint(ctx, FailAfterMark, s, ids); err != nil {
			return err
		}
		observe()
		return nil
	}
	if err := r.settleMark(ctx, s, l, pl, log); err != nil {
		return err
	}
	// The mark outlives the batch's context (cancelled when the batch
	// returns) but not its database budget: settleMark waits for it
	// within that bound.
	mctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.dbBudget())
	pm := &pendingMark{ids: ids, created: created, observe: observe, done: make(chan struct{}), cancel: cancel}
	go func() {
		defer close(pm.done)
		if err := r.failpoint(mctx, FailBeforeMarkPrevious, s, ids); err != nil {
			pm.err = err
			return
		}
		_, pm.err = r.store.MarkCommitted(mctx, l.Lease, ids, created)
	}()
	pl.pending = pm
	return nil
}

// settleMark waits for the pipelined mark in flight, if any, and makes it
// durable: an attempt that failed for a reason the database may mend (away,
// timed out) is retried as the serial loop retries it. A lost lease or a
// failpoint stops the loop; the batch is then committed and unmarked, and
// listed in the newest checkpoint, whose recovery marks it.
func (r *Relay) settleMark(ctx context.Context, s int32, l *lease, pl *pipeline, log *slog.Logger) error {
	pm := pl.pending
	if pm == nil {
		return nil
	}
	pl.pending = nil
	// Like a batch, the mark runs to its end when shutdown begins, within
	// the shutdown grace: a clean stop marks what it committed.
	ctx, cancel := graceful(ctx, r.cfg.ShutdownTimeout)
	defer cancel()
	l.step(r.dbBudget())
	err := pm.wait()
	var crash errCrash
	switch {
	case err == nil:
	case errors.As(err, &crash), errors.Is(err, outbox.ErrLeaseLost):
		return err
	default:
		log.Warn("pipelined mark published failed, retrying", "err", err, "rows", len(pm.ids))
		if _, err := r.markRetrying(ctx, l, len(pm.ids), log, func(ctx context.Context) (int64, error) {
			return r.store.MarkCommitted(ctx, l.Lease, pm.ids, pm.created)
		}); err != nil {
			return err
		}
	}
	if err := r.failpoint(ctx, FailAfterMark, s, pm.ids); err != nil {
		return err
	}
	pm.observe()
	return nil
}

// endPipeline settles the mark in flight when the loop ends. After a clean
// stop (err nil) the mark is made durable (settleMark: bounded by the
// shutdown grace);
// after an error it is only waited for: recovery marks the batch from the
// checkpoint whether this mark landed or not.
func (r *Relay) endPipeline(ctx context.Context, s int32, l *lease, log *slog.Logger, err error) error {
	pl := l.pipe
	l.pipe = nil
	if pl != nil {
		pl.dropReadAhead()
	}
	if pl == nil || pl.pending == nil {
		return err
	}
	if err != nil {
		l.step(r.dbBudget())
		pl.pending.wait()
		return err
	}
	return r.settleMark(ctx, s, l, pl, log)
}

// rowIDs returns the ids of rows.
func rowIDs(rows []outbox.Row) []int64 {
	ids := make([]int64, len(rows))
	for i, row := range rows {
		ids[i] = row.ID
	}
	return ids
}
