package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/txn"
)

// switchBack hands shard s over from the replication source (the latest
// checkpoint cp is one of its own) to the poll read, which publishes the
// rows the table has unmarked: the rows the replication source published
// are marked first, and no other row is.
//
//  1. A temporary slot is created with an exported snapshot: its consistent
//     point C splits the outbox's transactions into those ending at or
//     before C, all visible in the snapshot, and those after, none visible.
//     A transaction of this relay imports the snapshot.
//  2. The relay's slot is read from cp's position up to C, through the
//     replication source's own publish (each Kafka transaction with its
//     LSN checkpoint): Kafka then holds every row of a transaction ending
//     at or before C that was not marked, and no row of one after it.
//  3. Every row the snapshot sees unmarked is marked (MarkCommitted: the
//     same row, under the shard's lease), in chunks.
//  4. A checkpoint-only Kafka transaction of the poll read records the
//     hand-over point (Handover = C, SwitchedFrom = replication).
//  5. The relay's slot is dropped: nothing reads it any more, and it would
//     keep WAL.
//
// A crash before 4 starts it again from the newest checkpoint (the drain's,
// still the replication source's) with a new point; the rows marked by then
// are not read again, and the rest are published up to the new point first;
// one after 4 leaves at most the slot, which the next recovery drops
// (dropSwitchedSlot).
func (r *Relay) switchBack(ctx context.Context, s int32, l *lease, p *txn.Producer, cp *txn.Checkpoint, log *slog.Logger) error {
	ws := walSource{r}
	cfg := r.replicationConfig()
	from, handover, err := positionOf(cp)
	if err != nil {
		return err
	}
	l.step(r.recoveryBudget())
	conn, err := replicationConn(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	until, snapshot, err := replication.SnapshotPoint(ctx, conn, switchSlotName(cfg.Slot))
	if err != nil {
		return fmt.Errorf("switch back to poll: %w", err)
	}
	tx, err := r.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return fmt.Errorf("switch back to poll: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // after the first Rollback, a no-op
	if _, err := tx.Exec(ctx, "SET TRANSACTION SNAPSHOT '"+snapshot+"'"); err != nil {
		return fmt.Errorf("switch back to poll: import the snapshot at %s: %w", until, err)
	}
	// The snapshot is imported: the temporary slot is not needed any more.
	conn.Close(context.WithoutCancel(ctx))
	log.Info("switch back to the poll read: draining the slot", "slot", cfg.Slot, "from_lsn", from.EndLSN.String(), "until_lsn", until.String())
	reached, err := ws.stream(ctx, s, l, p, cfg, from, handover, until, log, func() {})
	if err != nil {
		return fmt.Errorf("switch back to poll: %w", err)
	}
	l.step(r.dbBudget())
	ids, created, err := r.store.Unmarked(ctx, tx)
	if err != nil {
		return fmt.Errorf("switch back to poll: %w", err)
	}
	if err := tx.Rollback(ctx); err != nil {
		return fmt.Errorf("switch back to poll: end the snapshot's transaction: %w", err)
	}
	// Every row the snapshot saw unmarked is in a transaction ending at or
	// before the point, which Kafka now holds: each is marked (in delete
	// mode deleted) only if it is still that row (I5), under the lease, in
	// chunks; a crash in between leaves fewer to mark the next time.
	var marked int64
	for len(ids) > 0 {
		n := min(len(ids), 5000)
		l.step(r.dbBudget())
		m, err := r.markRetrying(ctx, l, n, log, func(ctx context.Context) (int64, error) {
			return r.store.MarkCommitted(ctx, l.Lease, ids[:n], created[:n])
		})
		if err != nil {
			return fmt.Errorf("switch back to poll: %w", err)
		}
		marked += m
		ids, created = ids[n:], created[n:]
	}
	rec := txn.Checkpoint{Relay: r.cfg.RelayName, Shard: s, Table: r.store.Table().String(), Incarnation: r.incarnation,
		Handover: until.String(), SwitchedFrom: sourceReplication}
	if h := r.history.Load(); h != nil {
		rec.SystemID, rec.Timeline = h.SystemID, h.Timeline
	}
	l.step(r.txnBudget())
	tctx, cancel := context.WithTimeout(ctx, r.txnBudget())
	err = p.Publish(tctx, nil, rec, nil)
	cancel()
	if err != nil {
		return fmt.Errorf("switch back to poll: the hand-over checkpoint: %w", err)
	}
	log.Info("switched back to the poll read", "slot", cfg.Slot, "handover_lsn", until.String(), "drained_to_lsn", reached.String(), "marked", marked)
	return r.dropSwitchedSlot(ctx, log)
}

// dropSwitchedSlot drops the replication source's slot once the poll read
// has taken over (its hand-over checkpoint committed): the slot would keep
// WAL for nothing. A slot some walsender still holds is left, with a
// warning.
func (r *Relay) dropSwitchedSlot(ctx context.Context, log *slog.Logger) error {
	cfg := r.replicationConfig()
	conn, err := replicationConn(ctx, cfg)
	if err != nil {
		return err
	}
	defer conn.Close(context.WithoutCancel(ctx))
	slot, err := replication.ReadSlot(ctx, conn, cfg.Slot)
	switch {
	case errors.Is(err, replication.ErrNoSlot):
		return nil
	case err != nil:
		return fmt.Errorf("switch back to poll: %w", err)
	case slot.ActivePID != 0:
		log.Warn("the replication slot is still held by a walsender: not dropped; drop it once it is free, it keeps WAL", "slot", cfg.Slot, "active_pid", slot.ActivePID)
		return nil
	}
	if err := replication.DropSlot(ctx, conn, cfg.Slot); err != nil {
		return fmt.Errorf("switch back to poll: %w", err)
	}
	log.Info("replication slot dropped: the poll read publishes", "slot", cfg.Slot)
	return nil
}

// switchSlotName is the temporary slot of a switch back.
func switchSlotName(slot string) string {
	const suffix = "_switch"
	if len(slot) > 63-len(suffix) {
		slot = slot[:63-len(suffix)]
	}
	return slot + suffix
}
