package relay

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"
	"unicode/utf8"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/txn"
)

// errCheckpointMismatch: the checkpoint was written for another outbox table
// or relay; applying it could mark rows that were never published.
var errCheckpointMismatch = errors.New("checkpoint belongs to another outbox table or relay")

// stopsRelay reports whether err must stop the whole relay rather than be
// retried: a failpoint (a simulated crash), a Kafka error no retry mends, or
// a checkpoint it must not apply.
func stopsRelay(err error) bool {
	var crash errCrash
	return errors.As(err, &crash) || errors.Is(err, txn.ErrFatal) ||
		errors.Is(err, errCheckpointMismatch) || errors.Is(err, txn.ErrCheckpointFormat) ||
		// Another history than the checkpoint's (system identifier,
		// timeline, slot dropped, moved or lost): retrying cannot help,
		// and going on from another position would lose or repeat events.
		errors.Is(err, replication.ErrHistory)
}

// haltsShard reports whether err stops one shard for good while the relay
// goes on with the others: its checkpoint partition holds a record that is
// not a checkpoint. Retrying would loop forever; guessing could mark rows
// never published.
func haltsShard(err error) bool { return errors.Is(err, txn.ErrCheckpointForeign) }

// runShard owns shard l.Shard until ctx ends or the shard is lost:
// recovery, then the publish loop, again after every unknown commit outcome.
// Every step it takes is recorded in l (its bound), so that the lease is
// renewed only while the worker makes progress.
//
// A batch or recovery that fails for a reason no row is to blame for
// (NOT_ENOUGH_REPLICAS, an offline partition, a broker or the database away)
// is retried here with backoff, for as long as it takes: each failure in a
// row is counted in outbox_relay_shard_consecutive_failures, which the first
// success resets, so that a shard stuck this way is visible.
//
// The backoff (100 ms, doubling to a 10 s cap) runs on across recoveries: a
// recovery that succeeds is no success of the shard, so it does not reset
// the backoff; only a batch that commits (or a read that finds the shard
// empty) does. Else a batch that fails after every successful recovery is
// retried about 8 times a second, each with a new InitProducerID (counted
// in outbox_relay_producer_id_requests_total).
func (r *Relay) runShard(ctx context.Context, l *lease) error {
	s := l.Shard
	log := r.log.With("shard", s, "token", l.Token)
	label := strconv.Itoa(int(s))
	const firstBackoff, maxBackoff = 100 * time.Millisecond, 10 * time.Second
	backoff := firstBackoff
	healthy := func() {
		backoff = firstBackoff
		if n := l.failures.Swap(0); n > 0 {
			log.Info("shard healthy again", "failures", n)
			r.m.ConsecutiveFailures.WithLabelValues(label).Set(0)
		}
	}
	for ctx.Err() == nil {
		l.step(r.recoveryBudget())
		p, err := r.recoverShard(ctx, s, l, log)
		if err == nil {
			err = r.source().run(ctx, s, l, p, log, healthy)
			p.Close()
		}
		wait := jittered(backoff)
		var crash errCrash
		switch {
		// Reported even while the shard is being stopped, like a fencing
		// below: the loss of the lease is what stops it.
		case errors.Is(err, outbox.ErrLeaseLost):
			if ctx.Err() == nil { // else the ownership loop counted it
				r.m.ShardsLost.WithLabelValues(label).Inc()
			}
			log.Error("shard lost", "reason", "its lease was taken over: this relay changes no row of the shard", "err", err)
			return err
		// A fencing is reported even while the shard is being stopped: a
		// zombie typically meets it just after it lost ownership, which
		// is what cancelled ctx.
		case ctx.Err() != nil && !errors.As(err, &crash) && !errors.Is(err, txn.ErrFenced):
			return nil
		case stopsRelay(err):
			log.Error("shard stopped", "err", err)
			return err
		case haltsShard(err):
			log.Error("shard stopped until an operator acts; the relay goes on with its other shards", "err", err)
			return err
		case errors.Is(err, txn.ErrFenced):
			// Ownership in Kafka says another relay writes this shard.
			r.m.Fenced.WithLabelValues(label).Inc()
			log.Error("fenced: another relay took this shard's transactional id; this relay stops writing it", "err", err)
			return err
		case r.mode.Transactional() && !r.kafkaReachable(ctx):
			// A batch or recovery failed and this instance cannot reach
			// Kafka (a partition that leaves PostgreSQL up): give the
			// shard up at once, rather than keep its lease by retrying,
			// so a standby that reaches Kafka takes it; the gate keeps
			// this instance from taking it back until Kafka answers.
			r.kafka.shut()
			r.failed(l)
			r.m.ShardsLost.WithLabelValues(label).Inc()
			log.Error("shard lost", "reason", "this instance cannot reach Kafka: shard given up to a standby", "err", err)
			return errKafkaUnreachable
		default:
			log.Warn("shard recovering after error", "err", err, "retry_in", wait.String(), "consecutive_failures", r.failed(l))
		}
		l.step(wait)
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(wait):
		}
		backoff = min(2*backoff, maxBackoff)
	}
	return nil
}

// graceful returns a context for a batch: not cancelled with ctx, so a batch
// that has begun runs to its end when shutdown begins, but cancelled grace
// after ctx is, so that shutdown is bounded (OUTBOX_SHUTDOWN_TIMEOUT).
func graceful(ctx context.Context, grace time.Duration) (context.Context, context.CancelFunc) {
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	var timer *time.Timer
	var mu sync.Mutex
	stop := context.AfterFunc(ctx, func() {
		mu.Lock()
		defer mu.Unlock()
		timer = time.AfterFunc(grace, cancel)
	})
	return bctx, func() {
		stop()
		mu.Lock()
		if timer != nil {
			timer.Stop()
		}
		mu.Unlock()
		cancel()
	}
}

// txnBudget bounds one Kafka transaction or send; past it, the relay
// recovers.
func (r *Relay) txnBudget() time.Duration {
	if r.mode.Transactional() {
		// Give up (abort, recover) before the broker's transaction timeout
		// aborts it and bumps the epoch, which would read as a fencing.
		return r.tcfg.Settings.TransactionTimeout * 9 / 10
	}
	return r.tcfg.Settings.DeliveryTimeout
}

// jittered spreads a backoff by up to ±20%, so that relays failing together
// (a broker restart) do not retry in lockstep.
func jittered(d time.Duration) time.Duration {
	return d + time.Duration((rand.Float64()*0.4-0.2)*float64(d))
}

// recoverShard runs recovery before the shard's first read and after any
// unknown commit outcome.
//  1. NewProducer runs InitProducerID with the shard's transactional id,
//     fencing every earlier producer and settling its open transaction;
//  2. ReadCheckpoint reads the newest committed checkpoint (read_committed);
//  3. the rows of its recovery window are marked published, each only if it
//     is provably the row recorded (applyCheckpoint; idempotent).
//
// I3: the publish loop reads no row before these three steps are done.
//
// l is the shard's lease, taken before recovery: every mark carries it.
func (r *Relay) recoverShard(ctx context.Context, s int32, l *lease, log *slog.Logger) (*txn.Producer, error) {
	label := strconv.Itoa(int(s))
	r.m.Recoveries.WithLabelValues(label).Inc()
	if r.mode.Transactional() {
		// NewProducer runs InitProducerID, which bumps the epoch.
		r.m.ProducerIDRequests.WithLabelValues(label).Inc()
	}
	p, err := txn.NewProducer(ctx, r.tcfg, s)
	if err != nil {
		return nil, fmt.Errorf("recover shard %d: %w", s, err)
	}
	switch r.mode {
	case txn.AtLeastOnce:
		// Nothing to settle: an unmarked batch is sent again (the
		// at-least-once promise), with the same outbox-id headers.
		log.Info("shard recovered", "delivery", string(r.mode))
		return p, nil
	case txn.AtMostOnce:
		// A batch marked but perhaps never sent: report it, it is lost.
		lost, err := r.store.TakeInflight(ctx, l.Lease)
		if err != nil {
			p.Close()
			return nil, fmt.Errorf("recover shard %d: %w", s, err)
		}
		if len(lost) > 0 {
			r.m.PossiblyLost.WithLabelValues(label).Add(float64(len(lost)))
			log.Error("at-most-once: the previous owner marked these rows published and stopped before confirming the send; they may be lost",
				"rows", len(lost), "ids", lost)
		}
		log.Info("shard recovered", "delivery", string(r.mode), "possibly_lost", len(lost))
		return p, nil
	}
	h, err := r.store.History(ctx)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("recover shard %d: %w", s, err)
	}
	r.history.Store(&h)
	cp, err := p.ReadCheckpoint(ctx)
	if err != nil {
		p.Close()
		return nil, fmt.Errorf("recover shard %d: %w", s, err)
	}
	w := txn.Window{Limit: r.cfg.RecoveryWindow, MaxBytes: r.windowBytes()}
	var marked int64
	if cp != nil {
		if cp.Incarnation != r.incarnation || cp.Relay != r.cfg.RelayName || cp.Shard != s || cp.Table != r.store.Table().String() {
			p.Close()
			return nil, fmt.Errorf("recover shard %d: %w: checkpoint in %q partition %d was written by relay %q for table %s (incarnation %s), this is relay %q on %s (incarnation %s); "+
				"was the table dropped and created again, or does another relay share the topic? Use a new OUTBOX_CHECKPOINT_TOPIC",
				s, errCheckpointMismatch, r.cfg.CheckpointTopic, s, cp.Relay, cp.Table, cp.Incarnation, r.cfg.RelayName, r.store.Table(), r.incarnation)
		}
		if cp.Source == sourceReplication && r.cfg.Source != sourceReplication {
			// The table was read from the WAL: its published rows are
			// not marked. The switch back marks them (switchback.go);
			// the poll read starts with an empty window.
			if err := r.switchBack(ctx, s, l, p, cp, log); err != nil {
				p.Close()
				return nil, fmt.Errorf("recover shard %d: %w", s, err)
			}
			p.StartWindow(w)
			log.Info("shard recovered", "epoch", p.Epoch(), "source", sourcePoll, "switched_from", sourceReplication)
			return p, nil
		}
		if cp.SwitchedFrom == sourceReplication && r.cfg.Source != sourceReplication {
			// A crash after the switch back's checkpoint may have left
			// the slot, which keeps WAL.
			if err := r.dropSwitchedSlot(ctx, log); err != nil {
				log.Warn("the replication slot of the switch back was not dropped: it keeps WAL; drop it by hand", "err", err)
			}
		}
		if cp.Source == sourceReplication {
			// Nothing to mark: the replication loop starts at the
			// checkpoint's position (replicate.go).
			log.Info("shard recovered", "epoch", p.Epoch(), "source", sourceReplication, "lsn", cp.LSN)
			return p, nil
		}
		if marked, err = r.applyCheckpoint(ctx, s, l, cp, &w, log); err != nil {
			p.Close()
			return nil, fmt.Errorf("recover shard %d: %w", s, err)
		}
	}
	p.StartWindow(w)
	log.Info("shard recovered", "epoch", p.Epoch(), "window_batches", w.Batches(), "window_rows", len(w.Rows()), "marked", marked, "pipelined", r.pipelined())
	return p, nil
}

// applyCheckpoint is recovery step 3. The window "committed in Kafka, not
// marked in PostgreSQL" closes here: the checkpoint lists the rows of the
// shard's last batches (I2), and they are marked published, each only if it
// is provably the row the checkpoint recorded: same id and same creation
// time (I5). Marks lost for up to OUTBOX_RECOVERY_WINDOW batches (a database
// crash, a fail-over to an asynchronous standby) are re-applied, so nothing
// is published twice. A table gone back in time (restore, RESTART IDENTITY)
// is reported, and its new rows that reuse recorded ids stay unmarked, to be
// published: nothing new is marked without being published. On return, w is
// the window the shard's next checkpoints carry on.
func (r *Relay) applyCheckpoint(ctx context.Context, s int32, l *lease, cp *txn.Checkpoint, w *txn.Window, log *slog.Logger) (int64, error) {
	// The whole recorded window, whatever this instance's own
	// OUTBOX_RECOVERY_WINDOW (I9): the writer's pipelined loop may have
	// left batch n's mark in flight and n+1 committed, both listed there.
	// This instance's limit applies from its first batch on (Window.With),
	// after every recorded row was marked durably here.
	from, err := cp.RecoveryWindow(r.cfg.RecoveryWindow, r.windowBytes())
	if err != nil {
		return 0, err
	}
	if from.Batches() > r.cfg.RecoveryWindow {
		log.Info("the checkpoint's window holds more batches than OUTBOX_RECOVERY_WINDOW: recovery marks every batch it recorded",
			"recorded_batches", from.Batches(), "recovery_window", r.cfg.RecoveryWindow)
	}
	rows := from.Rows()
	ids := make([]int64, len(rows))
	created := make([]time.Time, len(rows))
	for i, row := range rows {
		ids[i], created[i] = row.ID, row.Created
	}
	// Before the marks: in delete mode they remove the rows.
	gone, err := r.historyChanged(ctx, cp, ids, log)
	if err != nil {
		return 0, err
	}
	var marked int64
	if cp.Version == 1 {
		// Written before the upgrade: ids without fingerprints. A row
		// created after the checkpoint cannot be one it recorded. The
		// window starts empty: these marks are durable before any new
		// checkpoint is written.
		created = nil
		marked, err = r.markRetrying(ctx, l, len(ids), log, func(ctx context.Context) (int64, error) {
			return r.store.MarkCommittedBefore(ctx, l.Lease, ids, cp.Written)
		})
	} else {
		*w = from
		marked, err = r.markRetrying(ctx, l, len(ids), log, func(ctx context.Context) (int64, error) {
			return r.store.MarkCommitted(ctx, l.Lease, ids, created)
		})
	}
	if err != nil {
		return 0, err
	}
	r.m.RecoveredMarked.WithLabelValues(strconv.Itoa(int(s))).Add(float64(marked))
	rw, err := r.store.Rewound(ctx, ids, created)
	if err != nil {
		return marked, err
	}
	r.reportPhantoms(s, ids, gone, rw.Replaced, log)
	if rw.Detected() {
		r.m.Rewinds.WithLabelValues(strconv.Itoa(int(s))).Inc()
		maxID := slices.Max(ids)
		log.Error("the outbox table went back in time (a restore, TRUNCATE ... RESTART IDENTITY, or a fail-over that lost WAL): "+
			"the checkpoint records rows already published to Kafka that the table no longer holds. Rows that reuse their ids are not marked and will be published, "+
			"with outbox-id headers that repeat ids already in Kafka: move the sequence past them, e.g. SELECT setval(pg_get_serial_sequence('"+r.store.Table().Ident()+"', 'id'), "+strconv.FormatInt(maxID, 10)+"), and see the README's restore section",
			"checkpoint_max_id", maxID, "sequence_last_value", rw.SequenceLast, "ahead_of_sequence", rw.AheadOfSequence,
			"ids_reused", len(rw.Replaced), "reused_ids", head(rw.Replaced, 20))
	}
	return marked, nil
}

// windowBytes bounds the recovery window in a checkpoint record: half the
// producer's batch.size, so the record always fits with its envelope.
func (r *Relay) windowBytes() int { return int(r.tcfg.Settings.BatchMaxBytes) / 2 }

// head returns the first n ids.
func head(ids []int64, n int) []int64 { return ids[:min(n, len(ids))] }

// markRetrying runs mark (a mark of rows rows under lease l) until it
// succeeds, retrying while the database is away. It gives up only when ctx
// ends (recovery then marks the rows from the checkpoint) or the lease is
// lost (the new owner's recovery marks them).
func (r *Relay) markRetrying(ctx context.Context, l *lease, rows int, log *slog.Logger, mark func(context.Context) (int64, error)) (int64, error) {
	backoff := 50 * time.Millisecond
	for {
		l.step(r.dbBudget())
		n, err := mark(ctx)
		if err == nil || errors.Is(err, outbox.ErrLeaseLost) {
			return n, err
		}
		log.Warn("mark published failed, retrying", "err", err, "rows", rows, "consecutive_failures", r.failed(l))
		l.step(backoff * 6 / 5)
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("mark published: %w", err)
		case <-time.After(jittered(backoff)):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// failed counts one more failed step of the shard in a row (a batch, a
// recovery, a mark retried) in outbox_relay_shard_consecutive_failures, and
// returns the count; the shard's next success resets it.
func (r *Relay) failed(l *lease) int64 {
	n := l.failures.Add(1)
	r.m.ConsecutiveFailures.WithLabelValues(strconv.Itoa(int(l.Shard))).Set(float64(n))
	return n
}

// The idle polling schedule of publishLoop.
const (
	firstIdlePoll = 2 * time.Millisecond
	idleGrace     = 32 * time.Millisecond
)

// publishLoop reads, publishes and marks batches until ctx ends or a batch
// fails in a way that needs recovery. It calls healthy after every batch
// that succeeded and every read that found the shard empty.
//
// Pipelined (see pipelined): the mark of batch n runs while batch n+1 is read
// (above batch n's last id) and its transaction runs; markBatch settles it
// after batch n+1 committed. When the loop ends, endPipeline settles the
// mark still in flight.
func (r *Relay) publishLoop(ctx context.Context, s int32, l *lease, p *txn.Producer, log *slog.Logger, healthy func()) (err error) {
	idleWait := time.Duration(0)
	r.wake.setIdle(s, false)
	defer r.wake.setIdle(s, true)
	var pl *pipeline
	if r.pipelined() {
		pl = &pipeline{}
		l.pipe = pl
		defer func() { err = r.endPipeline(ctx, s, l, log, err) }()
	}
	for {
		if ctx.Err() != nil {
			return nil
		}
		wake := r.wake.wait()
		rows, err := r.readBatch(ctx, s, l, pl, log)
		if err != nil {
			if ctx.Err() != nil && !errors.Is(err, outbox.ErrLeaseLost) {
				var crash errCrash
				if !errors.As(err, &crash) {
					return nil
				}
			}
			return err
		}
		if len(rows) == 0 && pl != nil && pl.pending != nil {
			// Nothing but the rows in flight: settle the mark and
			// read again from the start before going idle.
			if err := r.settleMark(ctx, s, l, pl, log); err != nil {
				return err
			}
			continue
		}
		if len(rows) == 0 {
			healthy()
			// Out of rows. First poll again after 2, 4, 8, 16 ms while
			// still holding the wake-up lock (writers do not notify):
			// under steady load the next commit is found this way and
			// the writers never pay for NOTIFY. Then declare the shard
			// idle, so that the next commit notifies, and keep polling
			// at growing intervals: that also finds a row inserted while
			// the lock was held and committed after the last poll.
			if idleWait == 0 {
				idleWait = firstIdlePoll
			} else {
				idleWait = min(2*idleWait, r.cfg.PollInterval)
			}
			if idleWait >= min(idleGrace, r.cfg.PollInterval) {
				r.wake.setIdle(s, true)
			}
			l.step(idleWait)
			select {
			case <-ctx.Done():
				return nil
			case <-wake:
				idleWait = 0
			case <-time.After(idleWait):
			}
			continue
		}
		r.wake.setIdle(s, false)
		idleWait = 0
		// The batch runs to its end even when shutdown begins: a clean
		// stop commits and marks what it has started.
		if err := r.waitForStandbys(ctx, l); err != nil {
			return err
		}
		bctx, cancel := graceful(ctx, r.cfg.ShutdownTimeout)
		err = r.publishRows(bctx, s, l, p, rows, log)
		cancel()
		if err != nil {
			return err
		}
		healthy()
		// A full batch polls again at once; a short one too, cheaply.
	}
}

// records turns rows into the records to send, in order, with each one's
// created_at, and collects the rows that cannot be sent with their reason:
// an oversize row, a column Kafka cannot take, a row naming the checkpoint
// topic, and the rows Kafka would refuse on their own account (a topic that
// does not exist, a partition it does not have, too large: Producer.Check).
// Those go to the dead-letter table before anything is sent, so they do not
// hold the batch, and in at-most-once mode they are not marked and lost.
func (r *Relay) records(ctx context.Context, l *lease, p *txn.Producer, rows []outbox.Row) ([]txn.Record, []time.Time, map[int64]error, error) {
	recs := make([]txn.Record, 0, len(rows))
	created := make([]time.Time, 0, len(rows))
	bad := map[int64]error{}
	for _, row := range rows {
		if row.Oversize != nil {
			bad[row.ID] = oversizeError(row)
			continue
		}
		rec, err := toRecord(row)
		if err == nil && row.Topic == r.cfg.CheckpointTopic {
			// A row in the checkpoint topic could forge a checkpoint and
			// have recovery mark rows that were never published.
			err = fmt.Errorf("column topic is %q, the relay's checkpoint topic (OUTBOX_CHECKPOINT_TOPIC): rows may not write there", row.Topic)
		}
		if err != nil {
			bad[row.ID] = err
			continue
		}
		rec.Created = row.CreatedAt
		recs = append(recs, rec)
		created = append(created, row.CreatedAt)
	}
	l.step(r.txnBudget())
	refused, err := p.Check(ctx, recs)
	if err != nil {
		return nil, nil, nil, err
	}
	for _, re := range refused {
		bad[re.ID] = re.Err
	}
	return recs, created, bad, nil
}

// publishRows validates rows, dead-letters the invalid ones and publishes the
// rest. Under hold-key, the later rows of a dead-lettered row's topic and
// key are not published in this batch: they stay unpublished, and the next
// read holds them (Store.ReadBatch).
func (r *Relay) publishRows(ctx context.Context, s int32, l *lease, p *txn.Producer, rows []outbox.Row, log *slog.Logger) error {
	recs, created, bad, err := r.records(ctx, l, p, rows)
	if err != nil {
		return err
	}
	held := r.newHolds()
	dead := held.deadLetters(rows, bad)
	if err := r.deadLetter(ctx, s, l, dead, log); err != nil {
		return err
	}
	recs, created = without(recs, created, dead)
	// The records hold the values from here on: the rows' copies of them
	// are not kept in memory while the batch is published.
	for i := range rows {
		rows[i].Value = nil
	}
	return r.publish(ctx, s, l, p, recs, created, held, log)
}

// holds are the topics and keys of a batch that a dead letter holds
// (OUTBOX_DEAD_LETTER_ORDER=hold-key): the batch publishes none of their
// rows after the dead letter, so that a key's records reach Kafka in id
// order. Those rows stay unpublished, and the next read holds them
// (Store.ReadBatch). Keyless rows are never held. nil under skip.
type holds map[string]bool

func (r *Relay) newHolds() holds {
	if r.order == outbox.Skip {
		return nil
	}
	return holds{}
}

func holdKey(topic string, key []byte) string { return topic + "\x00" + string(key) }

// rowHoldKey is holdKey of a row, which may come with the MD5 of its key
// instead of the key (a key larger than a record, Row.Oversize): every row
// of such a key comes so, and a key that comes is never that large, so the
// two never meet. ok is false for a keyless row.
func rowHoldKey(row outbox.Row) (k string, ok bool) {
	if row.Oversize != nil && row.Oversize.KeyDigest != nil {
		return row.Topic + "\x01" + string(row.Oversize.KeyDigest), true
	}
	return holdKey(row.Topic, row.Key), row.Key != nil
}

// hold records that the row of topic and key was dead-lettered.
func (h holds) hold(topic string, key []byte) {
	if h != nil && key != nil {
		h[holdKey(topic, key)] = true
	}
}

// has reports whether the rows of topic and key are held.
func (h holds) has(topic string, key []byte) bool {
	return h != nil && key != nil && h[holdKey(topic, key)]
}

// deadLetters returns the rows of bad (in id order) to dead-letter and
// holds their keys. A bad row after a dead letter of its key in the same
// batch is only held (not dead-lettered): it is checked again once the key
// is released.
func (h holds) deadLetters(rows []outbox.Row, bad map[int64]error) []outbox.DeadLetter {
	var dead []outbox.DeadLetter
	for _, row := range rows { // in id order
		err, ok := bad[row.ID]
		k, keyed := rowHoldKey(row)
		if !ok || h != nil && keyed && h[k] {
			continue
		}
		dead = append(dead, outbox.DeadLetter{ID: row.ID, Error: err.Error()})
		if h != nil && keyed {
			h[k] = true
		}
	}
	return dead
}

// release drops from recs the records of held keys: they are not published
// in this batch.
func (h holds) release(recs []txn.Record, created []time.Time) ([]txn.Record, []time.Time) {
	if len(h) == 0 {
		return recs, created
	}
	var keep []int64
	for _, rec := range recs {
		if !h.has(rec.Topic, rec.Key) {
			keep = append(keep, rec.ID)
		}
	}
	return subset(recs, created, keep)
}

// recordRows are recs as the rows holds.deadLetters takes.
func recordRows(recs []txn.Record) []outbox.Row {
	rows := make([]outbox.Row, len(recs))
	for i, rec := range recs {
		rows[i] = outbox.Row{ID: rec.ID, Topic: rec.Topic, Key: rec.Key}
	}
	return rows
}

// deadLetter moves rows to the dead-letter table under the shard's lease: a
// relay that lost the shard moves nothing (the new owner may have published
// the row).
func (r *Relay) deadLetter(ctx context.Context, s int32, l *lease, dead []outbox.DeadLetter, log *slog.Logger) error {
	if len(dead) == 0 {
		return nil
	}
	l.step(r.dbBudget())
	if l.pipe != nil {
		// A read-ahead begun before this move may hold rows of the keys it
		// holds: it is not used (readAhead).
		l.pipe.deadLettered++
	}
	n, err := r.store.MoveToDeadLetter(ctx, l.Lease, dead)
	if err != nil {
		return err
	}
	r.m.DeadLetters.WithLabelValues(strconv.Itoa(int(s))).Add(float64(n))
	ids := make([]int64, len(dead))
	for i, d := range dead {
		ids[i] = d.ID
	}
	log.Warn("rows moved to the dead-letter table", "ids", ids, "causes", deadLetterCauses(dead))
	return nil
}

// deadLetterCause is one error of a dead-letter move and the ids it holds
// for, as the move's log line lists them.
type deadLetterCause struct {
	Error string  `json:"error"`
	IDs   []int64 `json:"ids"`
}

// deadLetterCauses groups dead by error, in the order of their first row,
// so that the log line gives every row its own cause.
func deadLetterCauses(dead []outbox.DeadLetter) []deadLetterCause {
	var out []deadLetterCause
	at := map[string]int{}
	for _, d := range dead {
		i, ok := at[d.Error]
		if !ok {
			i = len(out)
			at[d.Error] = i
			out = append(out, deadLetterCause{Error: d.Error})
		}
		out[i].IDs = append(out[i].IDs, d.ID)
	}
	return out
}

// publish sends one batch in one transaction and marks it. When Kafka refuses
// some records for reasons of their own, it splits the batch in halves, in id
// order, until the refused rows stand alone, and dead-letters them.
//
// held are the keys dead-lettered earlier in the batch (nil under skip): their
// records are dropped here, and a record dead-lettered here holds its key for
// the rest of the batch (the second half of a split, too).
func (r *Relay) publish(ctx context.Context, s int32, l *lease, p *txn.Producer, recs []txn.Record, created []time.Time, held holds, log *slog.Logger) error {
	recs, created = held.release(recs, created)
	if len(recs) == 0 {
		return nil
	}
	switch r.mode {
	case txn.AtLeastOnce:
		return r.publishAtLeastOnce(ctx, s, l, p, recs, created, held, log)
	case txn.AtMostOnce:
		return r.publishAtMostOnce(ctx, s, l, p, recs, created, log)
	}
	label := strconv.Itoa(int(s))
	ids := make([]int64, len(recs))
	for i, rec := range recs {
		ids[i] = rec.ID
	}
	cp := txn.Checkpoint{Relay: r.cfg.RelayName, Shard: s, Table: r.store.Table().String(), Incarnation: r.incarnation}
	if h := r.history.Load(); h != nil {
		cp.SystemID, cp.Timeline = h.SystemID, h.Timeline
	}

	// The batch's payload, counted before Publish lets it go (sent).
	bytes := recordBytes(recs)
	// sent: Kafka acknowledged every record, the commit is next. The
	// records' keys, values and headers are needed no more (a failure
	// from here on is no *txn.RecordErrors: the batch is not split and
	// sent again), and are let go. Pipelined, the next batch is read from
	// here on, while the commit runs and the previous batch's mark is
	// settled: so the relay holds one batch's values at a time, not two.
	// The dead letters of this batch so far are committed, so that read
	// holds their keys' later rows; a dead letter after it began (the
	// second half of a split batch) makes it unusable (readAhead).
	sent := func() {
		for i := range recs {
			recs[i].Key, recs[i].Value, recs[i].Headers = nil, nil, nil
		}
		r.startReadAhead(ctx, s, l)
	}

	start := time.Now()
	l.step(r.txnBudget())
	tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
	err := p.Publish(tctx, recs, cp, sent)
	cancel()
	l.step(r.dbBudget())
	var rerrs *txn.RecordErrors
	switch {
	case errors.As(err, &rerrs) && rerrs.BeforeSend:
		// Refused before sending (a topic gone since publishRows checked
		// it): these rows alone are at fault, the rest goes on as it is.
		bad := make(map[int64]error, len(rerrs.Records))
		for _, re := range rerrs.Records {
			bad[re.ID] = re.Err
		}
		dead := held.deadLetters(recordRows(recs), bad)
		if err := r.deadLetter(ctx, s, l, dead, log); err != nil {
			return err
		}
		recs, created = without(recs, created, dead)
		return r.publish(ctx, s, l, p, recs, created, held, log)
	case errors.As(err, &rerrs):
		r.m.Aborts.WithLabelValues(label, "record_error").Inc()
		if len(recs) == 1 {
			held.hold(recs[0].Topic, recs[0].Key)
			return r.deadLetter(ctx, s, l, []outbox.DeadLetter{{ID: recs[0].ID, Error: rerrs.Records[0].Err.Error()}}, log)
		}
		// The halves run in id order, and the second drops the records of
		// keys the first dead-lettered.
		half := len(recs) / 2
		if err := r.publish(ctx, s, l, p, recs[:half], created[:half], held, log); err != nil {
			return err
		}
		return r.publish(ctx, s, l, p, recs[half:], created[half:], held, log)
	case errors.Is(err, txn.ErrCommitUnknown):
		r.m.Aborts.WithLabelValues(label, "commit_unknown").Inc()
		return err
	case err != nil:
		r.m.Aborts.WithLabelValues(label, "aborted").Inc()
		return err
	}
	commit := time.Now()
	r.m.TxnDuration.Observe(commit.Sub(start).Seconds())

	// Crash window: committed in Kafka, not marked. Closed by recovery,
	// which marks the rows of the latest checkpoint's window (I2).
	if err := r.failpoint(ctx, FailAfterCommit, s, ids); err != nil {
		return err
	}
	// I1: marked only now that the transaction holding them committed;
	// pipelined, the mark runs on while the next batch is published
	// (markBatch says how I2 holds meanwhile).
	// Counted published once marked.
	// The pending mark keeps observe until the next batch settles it: it
	// holds the batch's sizes, not its records.
	observe := func() { r.observeCommitted(s, len(recs), bytes, created, commit) }
	if err := r.markBatch(ctx, s, l, ids, created, observe, log); err != nil {
		return err
	}
	log.Debug("batch published", "rows", len(recs), "first_id", ids[0], "last_id", ids[len(ids)-1], "epoch", p.Epoch())
	return nil
}

// observeBatch records a published batch in the metrics.
func (r *Relay) observeBatch(s int32, recs []txn.Record, created []time.Time, at time.Time) {
	r.observeCommitted(s, len(recs), recordBytes(recs), created, at)
}

// observeCommitted records a published batch of n records and bytes payload
// bytes, created at created and published at at, in the metrics.
func (r *Relay) observeCommitted(s int32, n, bytes int, created []time.Time, at time.Time) {
	label := strconv.Itoa(int(s))
	for _, c := range created {
		r.m.EndToEnd.Observe(at.Sub(c).Seconds())
	}
	r.m.Published.WithLabelValues(label).Add(float64(n))
	r.m.PublishedBytes.WithLabelValues(label).Add(float64(bytes))
	r.m.BatchSize.Observe(float64(n))
}

// recordBytes is the payload of recs in bytes (txn.Record.Size).
func recordBytes(recs []txn.Record) int {
	n := 0
	for _, rec := range recs {
		n += rec.Size()
	}
	return n
}

// publishAtLeastOnce sends a batch without a transaction and marks what was
// acknowledged. A crash between the acknowledgement and the mark sends the
// batch again: duplicates are bounded to the unmarked batch and carry the
// same outbox-id header. Records Kafka refused are dead-lettered; records
// without an answer stay unmarked and are sent again after recovery.
//
// Under hold-key, the one-by-one retry sends no record of a key it found
// refused (held): those stay unmarked, and the next read holds them. A
// record of the key that the first send had already got acknowledged (in
// another record batch than the refused one) is in Kafka before its key's
// dead letter: at-least-once cannot take it back (see the README's limits;
// Producer.Check refuses the known causes before anything is sent).
func (r *Relay) publishAtLeastOnce(ctx context.Context, s int32, l *lease, p *txn.Producer, recs []txn.Record, created []time.Time, held holds, log *slog.Logger) error {
	start := time.Now()
	l.step(r.txnBudget())
	tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
	acked, refused, sendErr := p.Send(tctx, recs)
	cancel()
	if len(refused) > 0 && len(recs) > 1 && sendErr == nil {
		// Kafka refuses whole record batches: a refused row's batch-mates
		// are refused with it. Send each alone to find the culprits.
		byID := map[int64]txn.Record{}
		for _, rec := range recs {
			byID[rec.ID] = rec
		}
		retry := refused
		slices.SortFunc(retry, func(a, b *txn.RecordError) int { return cmp.Compare(a.ID, b.ID) })
		refused = nil
		for _, re := range retry {
			rec := byID[re.ID]
			if held.has(rec.Topic, rec.Key) {
				continue // a record of its key was refused before it
			}
			l.step(r.txnBudget())
			tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
			ok, bad, err := p.Send(tctx, []txn.Record{rec})
			cancel()
			acked, refused = append(acked, ok...), append(refused, bad...)
			if len(bad) > 0 {
				held.hold(rec.Topic, rec.Key)
			}
			if err != nil {
				sendErr = err
				break
			}
		}
	}
	l.step(r.dbBudget())
	if err := r.failpoint(ctx, FailAfterCommit, s, acked); err != nil {
		return err
	}
	if _, err := r.markRetrying(ctx, l, len(acked), log, func(ctx context.Context) (int64, error) {
		return r.store.MarkPublished(ctx, l.Lease, acked)
	}); err != nil {
		return err
	}
	if err := r.failpoint(ctx, FailAfterMark, s, acked); err != nil {
		return err
	}
	// Dead-letter only what was refused for certain: after another error,
	// refused rows may be batch-mates of the culprit; they stay unmarked and
	// are sent again after recovery.
	if len(refused) > 0 && sendErr == nil {
		dead := make([]outbox.DeadLetter, len(refused))
		for i, re := range refused {
			dead[i] = outbox.DeadLetter{ID: re.ID, Error: re.Err.Error()}
		}
		if err := r.deadLetter(ctx, s, l, dead, log); err != nil {
			return err
		}
	}
	done := time.Now()
	r.m.TxnDuration.Observe(done.Sub(start).Seconds())
	sentRecs, sentCreated := subset(recs, created, acked)
	r.observeBatch(s, sentRecs, sentCreated, time.Now())
	if sendErr != nil {
		r.m.Aborts.WithLabelValues(strconv.Itoa(int(s)), "send_failed").Inc()
		return sendErr
	}
	return nil
}

// publishAtMostOnce marks a batch published, recording it as in flight, and
// only then sends it with acks=0. A crash between the mark and the send
// loses the batch; the next owner reports it (log and metric). A failed send
// is a loss too, reported at once.
func (r *Relay) publishAtMostOnce(ctx context.Context, s int32, l *lease, p *txn.Producer, recs []txn.Record, created []time.Time, log *slog.Logger) error {
	label := strconv.Itoa(int(s))
	// Rows Kafka would refuse were dead-lettered before (publishRows runs
	// Producer.Check), not marked here and lost.
	ids := make([]int64, len(recs))
	for i, rec := range recs {
		ids[i] = rec.ID
	}
	// Only the rows this mark changed are sent: another relay that still
	// believes it owns the shard may have marked (and sent) the others.
	l.step(r.dbBudget())
	marked, batch, err := r.store.MarkInflight(ctx, l.Lease, ids)
	if err != nil {
		return err
	}
	recs, created = subset(recs, created, marked)
	// Crash window: marked, not sent. The in-flight record reports it.
	if err := r.failpoint(ctx, FailAfterMark, s, marked); err != nil {
		return err
	}
	start := time.Now()
	l.step(r.txnBudget())
	tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
	acked, refused, sendErr := p.Send(tctx, recs)
	cancel()
	if lost := len(recs) - len(acked); lost > 0 {
		r.m.PossiblyLost.WithLabelValues(label).Add(float64(lost))
		first := sendErr
		if first == nil && len(refused) > 0 {
			first = refused[0]
		}
		sent := make(map[int64]bool, len(acked))
		for _, id := range acked {
			sent[id] = true
		}
		var lostIDs []int64
		for _, rec := range recs {
			if !sent[rec.ID] {
				lostIDs = append(lostIDs, rec.ID)
			}
		}
		log.Error("at-most-once: rows marked published were not sent; they are lost", "rows", lost, "ids", lostIDs, "err", first)
	}
	l.step(r.dbBudget())
	if err := r.store.ConfirmInflight(ctx, l.Lease, batch); err != nil {
		return err
	}
	r.m.TxnDuration.Observe(time.Since(start).Seconds())
	sentRecs, sentCreated := subset(recs, created, acked)
	r.observeBatch(s, sentRecs, sentCreated, time.Now())
	if sendErr != nil {
		r.m.Aborts.WithLabelValues(label, "send_failed").Inc()
		return sendErr
	}
	return nil
}

// without returns the records (and creation times) not in dead.
func without(recs []txn.Record, created []time.Time, dead []outbox.DeadLetter) ([]txn.Record, []time.Time) {
	if len(dead) == 0 {
		return recs, created
	}
	gone := make(map[int64]bool, len(dead))
	for _, d := range dead {
		gone[d.ID] = true
	}
	var keep []int64
	for _, rec := range recs {
		if !gone[rec.ID] {
			keep = append(keep, rec.ID)
		}
	}
	return subset(recs, created, keep)
}

// subset returns the records (and creation times) whose ids are in ids.
func subset(recs []txn.Record, created []time.Time, ids []int64) ([]txn.Record, []time.Time) {
	keep := make(map[int64]bool, len(ids))
	for _, id := range ids {
		keep[id] = true
	}
	var outR []txn.Record
	var outC []time.Time
	for i, rec := range recs {
		if keep[rec.ID] {
			outR = append(outR, rec)
			outC = append(outC, created[i])
		}
	}
	return outR, outC
}

// recordMaxBytes is the largest record the producer sends: its batch.size
// (OUTBOX_KAFKA_BATCH_SIZE, franz-go's ProducerBatchMaxBytes), as the
// producer applies it (txn.Producer lowers it further per topic to the
// topic's max.message.bytes, which it checks before sending).
func recordMaxBytes(s txn.Settings) int32 {
	if s.BatchMaxBytes <= 0 {
		return 1 << 20
	}
	return s.BatchMaxBytes
}

// oversizeError is the dead-letter reason of a row larger than the largest
// record the producer sends (Row.Oversize): read without its value, it can
// never be published.
func oversizeError(row outbox.Row) error {
	o := row.Oversize
	return fmt.Errorf("%w: row is %d bytes (key %d, value %d, headers %d as JSON text), more than %d, the largest record the relay sends "+
		"(OUTBOX_KAFKA_BATCH_SIZE, which the topic's max.message.bytes may lower further); the relay did not read its value. "+
		"Shrink the row (store the payload elsewhere and send a reference), or raise OUTBOX_KAFKA_BATCH_SIZE and the topic's max.message.bytes, then requeue it",
		kerr.MessageTooLarge, o.Total(), o.Key, o.Value, o.Headers, o.Limit)
}

// toRecord turns a row into a Kafka record, or says what is wrong with it.
func toRecord(row outbox.Row) (txn.Record, error) {
	rec := txn.Record{ID: row.ID, Topic: row.Topic, Key: row.Key, Value: row.Value, Partition: -1, EventID: row.EventID}
	if utf8.RuneCountInString(row.Topic) > outbox.MaxTopicRead {
		return rec, fmt.Errorf("column topic: topic %.20q... is longer than %d characters: Kafka allows 249", row.Topic, outbox.MaxTopicRead)
	}
	if err := outbox.ValidTopic(row.Topic); err != nil {
		return rec, fmt.Errorf("column topic: %w", err)
	}
	if row.Partition != nil {
		if *row.Partition < 0 {
			return rec, fmt.Errorf("column partition is %d: must be >= 0, or NULL to hash the key", *row.Partition)
		}
		rec.Partition = *row.Partition
	}
	if row.Headers != nil {
		var h map[string]any
		if err := json.Unmarshal(row.Headers, &h); err != nil || h == nil {
			return rec, fmt.Errorf("column headers is %.60s: must be a JSON object of string to string", row.Headers)
		}
		// Headers go out sorted by name, so their order is stable.
		for _, k := range slices.Sorted(maps.Keys(h)) {
			if outbox.IsReservedHeader(k) {
				// A second outbox-id would make consumers that read the
				// last one (Java's lastHeader), or compare names loosely,
				// take this row for another.
				return rec, fmt.Errorf("column headers sets %q, which is reserved (%q in any case, with or without spaces): the relay sends the row id in it; rename the header (e.g. to %q)", k, outbox.ReservedHeader, "app-"+strings.TrimSpace(k))
			}
			if outbox.IsReservedEventHeader(k) {
				return rec, fmt.Errorf("column headers sets %q, which is reserved (%q in any case, with or without spaces): the relay sends column event_id in it; set the event_id column instead", k, outbox.ReservedEventHeader)
			}
			v, ok := h[k].(string)
			if !ok {
				return rec, fmt.Errorf("column headers: value of %q is %s, must be a string", k, jsonKind(h[k]))
			}
			rec.Headers = append(rec.Headers, kgo.RecordHeader{Key: k, Value: []byte(v)})
		}
	}
	return rec, nil
}

func jsonKind(v any) string {
	switch v.(type) {
	case nil:
		return "null"
	case bool:
		return "a boolean"
	case float64:
		return "a number"
	case []any:
		return "an array"
	case map[string]any:
		return "an object"
	}
	return fmt.Sprintf("%T", v)
}
