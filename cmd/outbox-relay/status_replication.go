package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/txn"
)

// statusReplication prints, with OUTBOX_SOURCE=replication, the slot (name,
// active walsender, confirmed flush position, restart_lsn, lag in bytes)
// and the position the shard's latest committed checkpoint recorded, which
// is where the next owner starts; the slot is never confirmed past it.
func statusReplication(ctx context.Context, st *statusRun) error {
	if st.s.source != "replication" {
		return nil
	}
	name := st.s.slot
	if name == "" {
		name = replication.DefaultSlot(st.pool.Config().ConnConfig.Database, st.s.schema, st.s.table)
	}
	pub := st.s.publication
	if pub == "" {
		pub = replication.DefaultPublication(st.s.schema, st.s.table)
	}
	st.line("source", "replication (OUTBOX_SOURCE): slot %s, publication %s", name, pub)
	conn, err := st.pool.Acquire(ctx)
	if err != nil {
		return fmt.Errorf("read replication slot %q: %w", name, err)
	}
	slot, err := replication.ReadSlot(ctx, conn.Conn().PgConn(), name)
	conn.Release()
	noSlot := errors.Is(err, replication.ErrNoSlot)
	switch {
	case noSlot:
		st.line("replication slot", "%s does not exist", name)
	case err != nil:
		return err
	default:
		if slot.ActivePID != 0 {
			st.line("replication slot", "%s, active pid %d", slot.Name, slot.ActivePID)
		} else {
			st.line("replication slot", "%s, not active (no relay reads it; it keeps WAL from %s)", slot.Name, slot.RestartLSN)
		}
		st.line("slot lag", "%d bytes (WAL written since the confirmed flush position)", slot.LagBytes)
		st.line("confirmed flush", "%s", slot.ConfirmedFlush)
		restart := slot.RestartLSN.String()
		if slot.WALStatus != "" {
			restart += " (wal_status " + slot.WALStatus + ")"
		}
		st.line("restart lsn", "%s", restart)
		if slot.WALStatus == "lost" {
			st.line("SLOT LOST", "WAL the slot needs was removed (max_slot_wal_keep_size): the relay stops; see docs/replication.md, \"Replication recovery\"")
		}
	}
	cp, err := statusCheckpoint(ctx, st)
	if err != nil {
		return err
	}
	if cp == nil {
		if noSlot {
			st.line("next start", "creates the slot and hands over from the poll read")
		}
		return nil
	}
	if cp.Source != "replication" {
		st.line("checkpoint lsn", "none: the latest checkpoint (written %s ago) is the poll read's; the next start in this mode hands over from it",
			time.Since(cp.Written).Round(time.Millisecond))
		return nil
	}
	line := fmt.Sprintf("%s (written %s ago", cp.LSN, time.Since(cp.Written).Round(time.Millisecond))
	if cp.RowIndex > 0 {
		line += fmt.Sprintf("; the first %d rows of the transaction ending there", cp.RowIndex)
	}
	if cp.Handover != "" {
		line += "; hand-over from the poll read at " + cp.Handover
	}
	st.line("checkpoint lsn", "%s)", line)
	if cp.SystemID != "" {
		st.line("checkpoint history", "system %s, timeline %d", cp.SystemID, cp.Timeline)
	}
	at, err := pglogrepl.ParseLSN(cp.LSN)
	if err != nil {
		return fmt.Errorf("the latest checkpoint's lsn %q does not parse: %w", cp.LSN, err)
	}
	if cp.RowIndex > 0 {
		if at, err = pglogrepl.ParseLSN(cp.CommitLSN); err != nil {
			return fmt.Errorf("the latest checkpoint's commit_lsn %q does not parse: %w", cp.CommitLSN, err)
		}
	}
	switch {
	case noSlot:
		st.line("SLOT MISSING", "the checkpoint is at %s but slot %s does not exist (dropped, or a fail-over to a server without it): the relay stops; see docs/replication.md, \"Replication recovery\"", at, name)
	case slot.ConfirmedFlush > at:
		st.line("SLOT AHEAD", "the slot is confirmed to %s, past the checkpoint's %s (advanced by hand, or dropped and created again): the relay stops rather than skip; see docs/replication.md, \"Replication recovery\"", slot.ConfirmedFlush, at)
	default:
		st.line("confirm behind", "%d bytes: the slot is confirmed that far behind the checkpoint (the relay confirms what Kafka holds with its next status update)", uint64(at-slot.ConfirmedFlush))
	}
	return nil
}

// statusCheckpoint reads the latest committed checkpoint of shard 0 (the
// replication source runs one shard) from the checkpoint topic recorded
// for the table, or OUTBOX_CHECKPOINT_TOPIC while none is recorded. It is
// nil, after saying why, when OUTBOX_KAFKA_BROKERS is not set.
func statusCheckpoint(ctx context.Context, st *statusRun) (*txn.Checkpoint, error) {
	if !slices.ContainsFunc(st.s.environ, func(kv string) bool {
		return strings.HasPrefix(kv, "OUTBOX_KAFKA_BROKERS=") && len(kv) > len("OUTBOX_KAFKA_BROKERS=")
	}) {
		st.line("checkpoint lsn", "not read: set OUTBOX_KAFKA_BROKERS (and the relay's OUTBOX_KAFKA_* settings) to show it")
		return nil, nil
	}
	cfg, err := relay.LoadConfig(st.s.environ)
	if err != nil {
		return nil, fmt.Errorf("configuration (to read the checkpoint): %w", err)
	}
	topic := cfg.CheckpointTopic
	var recorded *string
	if err := st.pool.QueryRow(ctx, `SELECT checkpoint_topic FROM `+st.s.outboxTable().StateIdent()).Scan(&recorded); err != nil {
		return nil, fmt.Errorf("read the checkpoint topic recorded for %s: %w", st.s.outboxTable(), err)
	}
	if recorded != nil {
		topic = *recorded
	}
	opts, err := relay.KafkaOptions(cfg)
	if err != nil {
		return nil, fmt.Errorf("configuration (to read the checkpoint): %w", err)
	}
	cl, err := kgo.NewClient(append(opts, kgo.SeedBrokers(cfg.KafkaBrokers...))...)
	if err != nil {
		return nil, fmt.Errorf("kafka client: %w", err)
	}
	defer cl.Close()
	rctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	td, err := kadm.NewClient(cl).ListTopics(rctx, topic)
	if err != nil {
		return nil, fmt.Errorf("read the metadata of checkpoint topic %s (brokers %s): %w", topic, strings.Join(cfg.KafkaBrokers, ","), err)
	}
	if !td.Has(topic) {
		st.line("checkpoint lsn", "none: checkpoint topic %s does not exist yet (the first relay creates it)", topic)
		return nil, nil
	}
	cp, err := txn.LatestCheckpoint(rctx, cl, topic, 0, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if err != nil {
		return nil, fmt.Errorf("read the latest checkpoint of %s partition 0 (brokers %s): %w", topic, strings.Join(cfg.KafkaBrokers, ","), err)
	}
	if cp == nil {
		st.line("checkpoint lsn", "none: no transaction committed yet in %s", topic)
	}
	return cp, nil
}
