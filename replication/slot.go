package replication

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
)

// Slot is what pg_replication_slots says about a slot.
type Slot struct {
	Name           string
	Plugin         string
	Database       string
	Active         bool
	ActivePID      int32 // 0 when no walsender holds it
	RestartLSN     LSN
	ConfirmedFlush LSN
	// WALStatus is reserved, extended, unreserved or lost (PostgreSQL 13+).
	WALStatus string
	// Failover reports a failover slot (PostgreSQL 17+; false before).
	Failover bool
	// LagBytes is how far the confirmed position is behind the server's
	// current WAL position: the WAL the slot keeps for the relay (0 on a
	// standby, where there is no current position).
	LagBytes int64
}

// ErrSlotBusy is returned when another walsender holds the slot: another
// relay reads it, or the walsender of one that died has not yet noticed.
var ErrSlotBusy = errors.New("replication: slot is in use by another connection")

// ReadSlot reads the slot's row on a connection (a replication connection
// with replication=database runs plain SQL too). ErrNoSlot when it does not
// exist.
func ReadSlot(ctx context.Context, conn *pgconn.PgConn, name string) (Slot, error) {
	failover := "false"
	if conn.ParameterStatus("server_version") != "" && serverMajor(conn) >= 17 {
		failover = "failover"
	}
	q := fmt.Sprintf(`SELECT slot_name, coalesce(plugin, ''), coalesce(database, ''), active, coalesce(active_pid, 0),
	coalesce(restart_lsn, '0/0'), coalesce(confirmed_flush_lsn, '0/0'), coalesce(wal_status, ''), %s,
	CASE WHEN pg_is_in_recovery() THEN 0 ELSE coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn), 0)::bigint END
	FROM pg_replication_slots WHERE slot_name = %s`, failover, quoteLiteral(name))
	res, err := conn.Exec(ctx, q).ReadAll()
	if err != nil {
		return Slot{}, fmt.Errorf("read slot %q: %w", name, err)
	}
	if len(res) != 1 || len(res[0].Rows) == 0 {
		return Slot{}, fmt.Errorf("%w: %q (the relay creates it on its first start)", ErrNoSlot, name)
	}
	r := res[0].Rows[0]
	s := Slot{Name: string(r[0]), Plugin: string(r[1]), Database: string(r[2]), Active: string(r[3]) == "t", WALStatus: string(r[7]), Failover: string(r[8]) == "t"}
	pid, _ := strconv.ParseInt(string(r[4]), 10, 32)
	s.LagBytes, _ = strconv.ParseInt(string(r[9]), 10, 64)
	s.ActivePID = int32(pid)
	if s.RestartLSN, err = pglogrepl.ParseLSN(string(r[5])); err != nil {
		return Slot{}, fmt.Errorf("read slot %q: restart_lsn: %w", name, err)
	}
	if s.ConfirmedFlush, err = pglogrepl.ParseLSN(string(r[6])); err != nil {
		return Slot{}, fmt.Errorf("read slot %q: confirmed_flush_lsn: %w", name, err)
	}
	if s.Plugin != "pgoutput" {
		return Slot{}, fmt.Errorf("%w: slot %q uses plugin %q, not pgoutput: it is not the relay's; set OUTBOX_REPLICATION_SLOT to another name", ErrHistory, name, s.Plugin)
	}
	return s, nil
}

// CreateSlot creates the logical slot with pgoutput and returns the
// position it starts at: transactions that commit after it are in the
// stream, earlier ones are not. failover makes it a failover slot
// (PostgreSQL 17+).
func CreateSlot(ctx context.Context, conn *pgconn.PgConn, name string, failover bool) (LSN, error) {
	q := fmt.Sprintf("SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput')", quoteLiteral(name))
	if failover {
		if serverMajor(conn) < 17 {
			return 0, fmt.Errorf("create slot %q: failover slots need PostgreSQL 17 or later", name)
		}
		q = fmt.Sprintf("SELECT lsn FROM pg_create_logical_replication_slot(%s, 'pgoutput', false, false, true)", quoteLiteral(name))
	}
	res, err := conn.Exec(ctx, q).ReadAll()
	if err != nil {
		return 0, fmt.Errorf("create slot %q: %w", name, err)
	}
	if len(res) != 1 || len(res[0].Rows) != 1 {
		return 0, fmt.Errorf("create slot %q: no position returned", name)
	}
	return pglogrepl.ParseLSN(string(res[0].Rows[0][0]))
}

// DropSlot drops the slot if it exists.
func DropSlot(ctx context.Context, conn *pgconn.PgConn, name string) error {
	q := fmt.Sprintf("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = %s", quoteLiteral(name))
	if _, err := conn.Exec(ctx, q).ReadAll(); err != nil {
		return fmt.Errorf("drop slot %q: %w", name, err)
	}
	return nil
}

func serverMajor(conn *pgconn.PgConn) int {
	v := conn.ParameterStatus("server_version")
	n := 0
	for _, c := range v {
		if c < '0' || c > '9' {
			break
		}
		n = n*10 + int(c-'0')
	}
	return n
}

// TakeOver ends the walsender that holds the slot, if any, and waits until
// the slot is free (C7). Call it only after the shard's producer has been
// fenced (InitProducerID): the old owner can then neither commit to Kafka
// nor, since it confirms only what it committed, move the slot.
func TakeOver(ctx context.Context, conn *pgconn.PgConn, name string, wait time.Duration) error {
	deadline := time.Now().Add(wait)
	for {
		slot, err := ReadSlot(ctx, conn, name)
		if err != nil {
			return err
		}
		if slot.ActivePID == 0 {
			return nil
		}
		q := fmt.Sprintf("SELECT pg_terminate_backend(%d)", slot.ActivePID)
		if _, err := conn.Exec(ctx, q).ReadAll(); err != nil {
			return fmt.Errorf("end the walsender %d that holds slot %q: %w (the relay's role needs pg_signal_backend, or the same role as the old owner)", slot.ActivePID, name, err)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%w: slot %q is still held by pid %d after %s", ErrSlotBusy, name, slot.ActivePID, wait)
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// SnapshotPoint creates a temporary logical slot on conn (a replication
// connection) and returns its consistent point and the name of a snapshot
// exported with it: a transaction that imports the snapshot (SET
// TRANSACTION SNAPSHOT) sees exactly the transactions whose commit ends at
// or before the point, and none that ends after it. The snapshot can be
// imported until the next command on conn; the slot goes away with conn.
func SnapshotPoint(ctx context.Context, conn *pgconn.PgConn, name string) (LSN, string, error) {
	res, err := pglogrepl.CreateReplicationSlot(ctx, conn, name, "pgoutput",
		pglogrepl.CreateReplicationSlotOptions{Temporary: true, SnapshotAction: "EXPORT_SNAPSHOT", Mode: pglogrepl.LogicalReplication})
	if err != nil {
		return 0, "", fmt.Errorf("create temporary slot %q with a snapshot: %w", name, err)
	}
	lsn, err := pglogrepl.ParseLSN(res.ConsistentPoint)
	if err != nil {
		return 0, "", fmt.Errorf("temporary slot %q: consistent point %q: %w", name, res.ConsistentPoint, err)
	}
	return lsn, res.SnapshotName, nil
}
