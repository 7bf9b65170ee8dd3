package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/txn"
)

// walSource is OUTBOX_SOURCE=replication: the shard's rows come from a
// logical replication slot of the outbox table's inserts (package
// replication), whole transactions in commit order; no row is marked. The
// position is the checkpoint's: each Kafka transaction records the end LSN
// of the last PostgreSQL transaction it holds (C1), the slot is confirmed
// only to what a committed transaction recorded (C3), and a restart starts
// at the newest checkpoint's position (C4, C5).
type walSource struct{ r *Relay }

// idleCheckpointEvery is how often an idle stream commits a checkpoint of
// its position, so that the slot releases WAL written for other tables.
const idleCheckpointEvery = 10 * time.Second

func (ws walSource) run(ctx context.Context, s int32, l *lease, p *txn.Producer, log *slog.Logger, healthy func()) error {
	r := ws.r
	l.step(r.recoveryBudget())
	cp, err := p.ReadCheckpoint(ctx)
	if err != nil {
		return fmt.Errorf("replication: read checkpoint: %w", err)
	}
	cfg := r.replicationConfig()
	from, handover, err := positionOf(cp)
	if err != nil {
		return err
	}
	if from.EndLSN == 0 {
		// The first start in this mode: hand over from the poll read.
		if from, handover, err = ws.handOver(ctx, s, l, p, cfg, log); err != nil {
			return err
		}
	}
	_, err = ws.stream(ctx, s, l, p, cfg, from, handover, 0, log, healthy)
	return err
}

// stream publishes the slot's transactions from the position from until
// ctx ends, or, with until not 0, until every transaction ending at or
// before until is published (and none after it); it returns the position
// the last committed checkpoint recorded.
func (ws walSource) stream(ctx context.Context, s int32, l *lease, p *txn.Producer, cfg replication.Config, from replication.Position,
	handover replication.LSN, until replication.LSN, log *slog.Logger, healthy func()) (replication.LSN, error) {
	r := ws.r
	l.step(r.dbBudget())
	stream, err := ws.open(ctx, cfg, from)
	if err != nil {
		return 0, err
	}
	defer stream.Close(context.WithoutCancel(ctx)) //nolint:errcheck // the position is in the checkpoint
	lagDone := make(chan struct{})
	lctx, stopLag := context.WithCancel(ctx)
	go func() {
		defer close(lagDone)
		ws.watchLag(lctx, cfg.Slot, log)
	}()
	defer func() { stopLag(); <-lagDone }()
	sys, tli := stream.System()
	log.Info("replication stream started", "slot", cfg.Slot, "publication", cfg.Publication, "lsn", stream.Start().String(),
		"row_index", from.RowIndex, "handover_lsn", handover.String(), "until_lsn", until.String(), "system_id", sys, "timeline", tli)
	reader := replication.NewReader(stream, replication.Limits{Rows: r.cfg.BatchSize, Bytes: int(r.cfg.readMaxBytes()), Linger: 5 * time.Millisecond, Until: until})
	lastCheckpoint := time.Now()
	committed := from.EndLSN
	if until != 0 && committed >= until && from.RowIndex == 0 {
		return committed, nil
	}
	// stopped is what an end of ctx returns: nil for the endless stream,
	// an error for a drain to until, which did not get there.
	stopped := func() error {
		if until != 0 {
			return fmt.Errorf("replication: drain to %s: %w", until, context.Cause(ctx))
		}
		return nil
	}
	for ctx.Err() == nil {
		l.step(r.cfg.ownerLease() / 2)
		rctx, cancel := context.WithTimeout(ctx, r.cfg.ownerLease()/4)
		b, err := reader.Next(rctx)
		cancel()
		if err != nil {
			if ctx.Err() != nil {
				return committed, stopped()
			}
			if isTimeout(err) {
				// Nothing arrived within the step: the loop lives on.
				healthy()
				continue
			}
			return committed, fmt.Errorf("replication: %w", err)
		}
		if len(b.Rows) == 0 {
			healthy()
			if b.End.EndLSN <= committed {
				if b.Reached {
					return committed, nil
				}
				continue
			}
			if !b.Reached && time.Since(lastCheckpoint) < idleCheckpointEvery {
				continue
			}
		}
		rows := b.Rows
		if handover != 0 {
			if rows, err = ws.notPolled(ctx, rows); err != nil {
				return committed, err
			}
			if b.End.EndLSN > handover {
				handover = 0
			}
		}
		bctx, cancelB := graceful(ctx, r.cfg.ShutdownTimeout)
		err = ws.publish(bctx, s, l, p, rows, b, handover, log)
		cancelB()
		if err != nil {
			return committed, err
		}
		stream.Confirm(b.Confirm)
		committed, lastCheckpoint = b.End.EndLSN, time.Now()
		healthy()
		if b.Reached {
			return committed, nil
		}
	}
	return committed, stopped()
}

// lagEvery is how often the slot's lag is read for
// outbox_relay_replication_lag_bytes.
const lagEvery = 5 * time.Second

// watchLag sets outbox_relay_replication_lag_bytes from pg_replication_slots
// until ctx ends, then drops the series (another owner reports it).
func (ws walSource) watchLag(ctx context.Context, slot string, log *slog.Logger) {
	g := ws.r.m.ReplicationLag
	defer g.DeleteLabelValues(slot)
	t := time.NewTicker(lagEvery)
	defer t.Stop()
	for {
		if err := ws.readLag(ctx, slot); err != nil && ctx.Err() == nil {
			log.Warn("read the replication slot's lag", "slot", slot, "err", err)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

func (ws walSource) readLag(ctx context.Context, slot string) error {
	conn, err := ws.r.pool.Acquire(ctx)
	if err != nil {
		return err
	}
	defer conn.Release()
	st, err := replication.ReadSlot(ctx, conn.Conn().PgConn(), slot)
	if err != nil {
		return err
	}
	ws.r.m.ReplicationLag.WithLabelValues(slot).Set(float64(st.LagBytes))
	return nil
}

func isTimeout(err error) bool {
	return pgconn.Timeout(err) || errors.Is(err, context.DeadlineExceeded)
}

// replicationConfig is the stream's configuration.
func (r *Relay) replicationConfig() replication.Config {
	t := r.store.Table()
	cfg := replication.Config{ConnString: r.cfg.DatabaseURL, Slot: r.cfg.ReplicationSlot, Publication: r.cfg.ReplicationPublication,
		Table: replication.Table{Schema: t.Schema, Name: t.Name}, StatusInterval: max(time.Second, r.cfg.ownerLease()/4)}
	if before := r.beforeConnect; before != nil {
		cfg.BeforeConnect = func(ctx context.Context, pc *pgconn.Config) error {
			cc := &pgx.ConnConfig{Config: *pc}
			if err := before(ctx, cc); err != nil {
				return err
			}
			*pc = cc.Config
			return nil
		}
	}
	if cfg.Slot == "" {
		cfg.Slot = replication.DefaultSlot(r.connCfg.Database, t.Schema, t.Name)
	}
	if cfg.Publication == "" {
		cfg.Publication = replication.DefaultPublication(t.Schema, t.Name)
	}
	return cfg
}

// positionOf is where a checkpoint says the stream goes on, and the
// hand-over position it recorded (0 when none).
func positionOf(cp *txn.Checkpoint) (replication.Position, replication.LSN, error) {
	if cp == nil || cp.Source != sourceReplication {
		return replication.Position{}, 0, nil
	}
	pos := replication.Position{SystemID: cp.SystemID, Timeline: cp.Timeline, RowIndex: cp.RowIndex}
	var err error
	parse := func(s string) replication.LSN {
		if s == "" || err != nil {
			return 0
		}
		var lsn replication.LSN
		lsn, err = pglogrepl.ParseLSN(s)
		return lsn
	}
	pos.EndLSN, pos.CommitLSN = parse(cp.LSN), parse(cp.CommitLSN)
	handover := parse(cp.Handover)
	if err != nil {
		return pos, 0, fmt.Errorf("replication: the checkpoint's position does not parse: %w", err)
	}
	return pos, handover, nil
}

// open opens the stream at from. A slot still held by the walsender of a
// previous owner (fenced by this shard's recovery, so it can neither
// commit nor confirm) is taken over (C7).
func (ws walSource) open(ctx context.Context, cfg replication.Config, from replication.Position) (*replication.Stream, error) {
	stream, err := replication.Open(ctx, cfg, from)
	if errors.Is(err, replication.ErrSlotBusy) {
		conn, cerr := replicationConn(ctx, cfg)
		if cerr != nil {
			return nil, cerr
		}
		terr := replication.TakeOver(ctx, conn, cfg.Slot, ws.r.cfg.ownerLease())
		conn.Close(context.WithoutCancel(ctx))
		if terr != nil {
			return nil, fmt.Errorf("replication: %w", terr)
		}
		stream, err = replication.Open(ctx, cfg, from)
	}
	if err != nil {
		return nil, fmt.Errorf("replication: %w", err)
	}
	return stream, nil
}

func replicationConn(ctx context.Context, cfg replication.Config) (*pgconn.PgConn, error) {
	pc, err := pgconn.ParseConfig(cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("replication connection string: %w", err)
	}
	pc.RuntimeParams["replication"] = "database"
	if cfg.BeforeConnect != nil {
		if err := cfg.BeforeConnect(ctx, pc); err != nil {
			return nil, fmt.Errorf("replication connection credentials: %w", err)
		}
	}
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	return conn, nil
}

// handOver starts the replication source where the poll read stops. The
// slot is created first (transactions that commit after its position are
// in the stream); then the poll read publishes, and marks, every row still
// unpublished; the WAL position after the last of those marks is the
// hand-over point. A row of a transaction that ends before it may have been
// published by the poll read: the stream skips the rows marked published
// until it passes that point (notPolled). A crash anywhere in between
// starts the hand-over again: the slot stays where it was created (nothing
// confirmed it), and the rows the poll read published are marked.
func (ws walSource) handOver(ctx context.Context, s int32, l *lease, p *txn.Producer, cfg replication.Config, log *slog.Logger) (replication.Position, replication.LSN, error) {
	r := ws.r
	if err := replication.EnsurePublication(ctx, r.pool, cfg.Publication, r.store.Table().Schema, r.store.Table().Name); err != nil {
		return replication.Position{}, 0, fmt.Errorf("replication: %w", err)
	}
	conn, err := replicationConn(ctx, cfg)
	if err != nil {
		return replication.Position{}, 0, err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	slot, err := replication.ReadSlot(ctx, conn, cfg.Slot)
	var start replication.LSN
	switch {
	case errors.Is(err, replication.ErrNoSlot):
		if start, err = replication.CreateSlot(ctx, conn, cfg.Slot, false); err != nil {
			return replication.Position{}, 0, fmt.Errorf("replication: %w", err)
		}
		log.Info("replication slot created", "slot", cfg.Slot, "lsn", start.String())
	case err != nil:
		return replication.Position{}, 0, fmt.Errorf("replication: %w", err)
	default:
		start = slot.ConfirmedFlush
		log.Info("replication slot found, hand-over from the poll read again", "slot", cfg.Slot, "confirmed_flush_lsn", start.String())
	}
	// The poll read's drain: every row unpublished now is published and
	// marked by the poll path, serially.
	drained := 0
	for ctx.Err() == nil {
		l.step(r.dbBudget())
		rows, err := r.read(ctx, s, l, nil)
		if err != nil {
			return replication.Position{}, 0, err
		}
		if len(rows) == 0 {
			break
		}
		drained += len(rows)
		bctx, cancel := graceful(ctx, r.cfg.ShutdownTimeout)
		err = r.publishRows(bctx, s, l, p, rows, log)
		cancel()
		if err != nil {
			return replication.Position{}, 0, err
		}
	}
	var lsnText string
	if err := r.pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&lsnText); err != nil {
		return replication.Position{}, 0, fmt.Errorf("replication: hand-over position: %w", err)
	}
	handover, err := pglogrepl.ParseLSN(lsnText)
	if err != nil {
		return replication.Position{}, 0, fmt.Errorf("replication: hand-over position: %w", err)
	}
	h := r.history.Load()
	from := replication.Position{EndLSN: start}
	if h != nil {
		from.SystemID, from.Timeline = h.SystemID, h.Timeline
	}
	log.Info("hand-over from the poll read", "drained_rows", drained, "slot_lsn", start.String(), "handover_lsn", handover.String())
	return from, handover, nil
}

// notPolled drops the rows the poll read published before the hand-over:
// it keeps only the rows still in the table and unmarked. A published row
// is marked, or gone once retention deleted it (a crash before the stream
// passed the hand-over point starts the hand-over again from the same
// slot, later); a dead-lettered row is gone too.
func (ws walSource) notPolled(ctx context.Context, rows []outbox.Row) ([]outbox.Row, error) {
	if len(rows) == 0 {
		return rows, nil
	}
	ids := make([]int64, len(rows))
	created := make([]time.Time, len(rows))
	for i, row := range rows {
		ids[i], created[i] = row.ID, row.CreatedAt
	}
	unpublished, err := ws.r.store.UnpublishedOf(ctx, ids, created)
	if err != nil {
		return nil, fmt.Errorf("replication: hand-over: %w", err)
	}
	out := rows[:0]
	for _, row := range rows {
		if unpublished[row.ID] {
			out = append(out, row)
		}
	}
	return out, nil
}

// publish commits one batch of the stream in one Kafka transaction whose
// checkpoint records the batch's end position. Rows Kafka cannot take go to
// the dead-letter table (OUTBOX_DEAD_LETTER_ORDER=skip); a batch whose rows
// are all gone still commits its checkpoint, so the position moves on.
func (ws walSource) publish(ctx context.Context, s int32, l *lease, p *txn.Producer, rows []outbox.Row, b replication.Batch, handover replication.LSN, log *slog.Logger) error {
	r := ws.r
	recs, created, bad, err := r.records(ctx, l, p, rows)
	if err != nil {
		return err
	}
	var dead []outbox.DeadLetter
	for _, row := range rows {
		if e, ok := bad[row.ID]; ok {
			dead = append(dead, outbox.DeadLetter{ID: row.ID, Error: e.Error()})
		}
	}
	if err := r.deadLetter(ctx, s, l, dead, log); err != nil {
		return err
	}
	recs, created = without(recs, created, dead)
	cp := txn.Checkpoint{Relay: r.cfg.RelayName, Shard: s, Table: r.store.Table().String(), Incarnation: r.incarnation,
		Source: sourceReplication, LSN: b.End.EndLSN.String(), RowIndex: b.End.RowIndex}
	if b.End.RowIndex > 0 {
		cp.CommitLSN = b.End.CommitLSN.String()
	}
	if handover != 0 {
		cp.Handover = handover.String()
	}
	if h := r.history.Load(); h != nil {
		cp.SystemID, cp.Timeline = h.SystemID, h.Timeline
	}
	start := time.Now()
	l.step(r.txnBudget())
	tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
	err = p.Publish(tctx, recs, cp, nil)
	cancel()
	label := strconv.Itoa(int(s))
	var rerrs *txn.RecordErrors
	switch {
	case errors.As(err, &rerrs):
		// Refused by Kafka itself: those rows go to the dead-letter
		// table, and the rest of the batch is committed again (the same
		// position: the aborted transaction recorded nothing).
		r.m.Aborts.WithLabelValues(label, "record_error").Inc()
		bad := map[int64]bool{}
		for _, re := range rerrs.Records {
			bad[re.ID] = true
		}
		var rest []outbox.Row
		var dead []outbox.DeadLetter
		for _, row := range rows {
			if bad[row.ID] {
				dead = append(dead, outbox.DeadLetter{ID: row.ID, Error: errOf(rerrs, row.ID)})
			} else {
				rest = append(rest, row)
			}
		}
		if err := r.deadLetter(ctx, s, l, dead, log); err != nil {
			return err
		}
		return ws.publish(ctx, s, l, p, rest, b, handover, log)
	case errors.Is(err, txn.ErrCommitUnknown):
		r.m.Aborts.WithLabelValues(label, "commit_unknown").Inc()
		return err
	case err != nil:
		r.m.Aborts.WithLabelValues(label, "aborted").Inc()
		return err
	}
	commit := time.Now()
	r.m.TxnDuration.Observe(commit.Sub(start).Seconds())
	if len(recs) > 0 {
		ids := make([]int64, len(recs))
		for i, rec := range recs {
			ids[i] = rec.ID
		}
		if err := r.failpoint(ctx, FailAfterCommit, s, ids); err != nil {
			return err
		}
		r.observeCommitted(s, len(recs), recordBytes(recs), created, commit)
	}
	return nil
}

func errOf(rerrs *txn.RecordErrors, id int64) string {
	for _, re := range rerrs.Records {
		if re.ID == id {
			return re.Err.Error()
		}
	}
	return "refused by Kafka"
}
