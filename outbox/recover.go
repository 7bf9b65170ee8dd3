package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// MarkCommitted marks published the rows a committed Kafka transaction holds,
// each identified by its id AND its creation time, and returns how many it
// marked. A row whose id matches but whose created_at does not is another
// row that reuses the id (after a point-in-time restore, TRUNCATE ...
// RESTART IDENTITY, or a fail-over that lost the sequence's latest WAL): it
// was never published, and is left unmarked (I5). Idempotent: recovery
// applies a checkpoint's window any number of times.
func (s *Store) MarkCommitted(ctx context.Context, l Lease, ids []int64, created []time.Time) (int64, error) {
	if s.deleting() { // OUTBOX_ON_PUBLISH=delete: the same proof, in ondelete.go
		return s.deleteCommitted(ctx, l, ids, created)
	}
	return s.underLease(ctx, l, len(ids), markWhat, `UPDATE `+s.t.Ident()+` o SET published_at = now()
    FROM unnest($1::bigint[], $4::timestamptz[]) AS c(id, created)
    WHERE o.id = c.id AND o.created_at = c.created AND o.published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token, created)
}

// MarkCommittedBefore marks published the rows with the given ids that were
// created no later than written. It applies checkpoints of format version 1,
// which carry ids without fingerprints: a row created after the checkpoint
// was written cannot be the row it recorded. Left unmarked by mistake, a row
// is published again (a duplicate), never lost.
func (s *Store) MarkCommittedBefore(ctx context.Context, l Lease, ids []int64, written time.Time) (int64, error) {
	if s.deleting() { // OUTBOX_ON_PUBLISH=delete: the same proof, in ondelete.go
		return s.deleteCommittedBefore(ctx, l, ids, written)
	}
	return s.underLease(ctx, l, len(ids), markWhat, `UPDATE `+s.t.Ident()+` SET published_at = now()
    WHERE id = ANY($1::bigint[]) AND created_at <= $4 AND published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token, written)
}

// markWhat names a mark in underLease's errors.
const markWhat = "mark %d rows of shard %d published in %s"

// underLease runs stmt (a data-modifying statement on the rows of lease l's
// shard, whose WHERE clause holds s.leaseHeld with the lease's shard and
// token as $2 and $3: a mark, or under Delete a delete) and returns how many
// rows it changed, or ErrLeaseLost (then it changed nothing: the lease check
// locks the owner row FOR SHARE, so a takeover waits for the statement, or
// the statement sees the new token). When it changed fewer rows than asked,
// which recovery's re-application of a window does as a rule, one more
// query tells a lost lease apart: tokens only grow, so a lease held after
// the statement was held during it. what names the statement in errors,
// with the row count, the shard and the table as verbs.
//
// No RETURNING and no CTE around the statement: the command tag's count is
// enough, and the wrapper cost 0.6-0.9 ms of server time a 1,000-row mark.
func (s *Store) underLease(ctx context.Context, l Lease, rows int, what, stmt string, args ...any) (int64, error) {
	if rows == 0 {
		return 0, nil
	}
	tag, err := s.pool.Exec(ctx, stmt, args...)
	n := tag.RowsAffected()
	if err == nil && n < int64(rows) {
		var held bool
		err = s.pool.QueryRow(ctx, `SELECT EXISTS (`+s.leaseRow(1, 2)+`)`, l.Shard, l.Token).Scan(&held)
		if err == nil && !held {
			err = ErrLeaseLost
		}
	}
	if err != nil {
		return 0, fmt.Errorf(what+": %w", rows, l.Shard, s.t, err)
	}
	return n, nil
}

// Rewind is what recovery found when it compared a checkpoint with the
// table: evidence that the table went back in time.
type Rewind struct {
	// SequenceLast is the last id the table's identity sequence handed out
	// (0 when it handed out none, or when the relay may not read the
	// sequence: then AheadOfSequence stays false).
	SequenceLast int64
	// AheadOfSequence: the checkpoint names ids the sequence has not
	// reached, so the table was restored to a point before they existed.
	AheadOfSequence bool
	// Replaced are ids of the checkpoint held now by other rows (another
	// created_at): new rows that reuse ids already published.
	Replaced []int64
}

// Rewound reports whether the table went back in time relative to a
// checkpoint that recorded these rows (ids with their creation times;
// created may be nil for a checkpoint without fingerprints, then only the
// sequence is compared). It reads the sequence through pg_sequences, which
// shows NULL instead of failing when the role may not read the sequence.
func (s *Store) Rewound(ctx context.Context, ids []int64, created []time.Time) (Rewind, error) {
	var rw Rewind
	if len(ids) == 0 {
		return rw, nil
	}
	var last *int64
	err := s.pool.QueryRow(ctx, `SELECT s.last_value FROM pg_sequences s
WHERE format('%I.%I', s.schemaname, s.sequencename) = pg_get_serial_sequence($1, 'id')`, s.t.Ident()).Scan(&last)
	if err != nil && err != pgx.ErrNoRows {
		return rw, fmt.Errorf("read the id sequence of %s: %w", s.t, err)
	}
	maxID := ids[0]
	for _, id := range ids {
		maxID = max(maxID, id)
	}
	if last != nil {
		rw.SequenceLast = *last
	}
	if err == nil && (last == nil || *last < maxID) {
		// last_value is NULL for a sequence that never handed out an id,
		// and for a role that may not read it; has_sequence_privilege
		// tells the two apart.
		var readable bool
		if err := s.pool.QueryRow(ctx, `SELECT has_sequence_privilege(pg_get_serial_sequence($1, 'id'), 'SELECT')
    OR has_sequence_privilege(pg_get_serial_sequence($1, 'id'), 'USAGE')`, s.t.Ident()).Scan(&readable); err != nil {
			return rw, fmt.Errorf("check privileges on the id sequence of %s: %w", s.t, err)
		}
		rw.AheadOfSequence = readable
	}
	if created != nil {
		rows, err := s.pool.Query(ctx, `SELECT o.id FROM `+s.t.Ident()+` o
JOIN unnest($1::bigint[], $2::timestamptz[]) AS c(id, created) ON o.id = c.id
WHERE o.created_at <> c.created ORDER BY o.id`, ids, created)
		if err != nil {
			return rw, fmt.Errorf("compare checkpoint rows with %s: %w", s.t, err)
		}
		if rw.Replaced, err = pgx.CollectRows(rows, pgx.RowTo[int64]); err != nil {
			return rw, fmt.Errorf("compare checkpoint rows with %s: %w", s.t, err)
		}
	}
	return rw, nil
}

// Detected reports whether the comparison found the table gone back in time.
func (rw Rewind) Detected() bool { return rw.AheadOfSequence || len(rw.Replaced) > 0 }

// Unmarked returns the id and creation time of every row of the table that
// tx's snapshot sees unpublished, in id order. The switch from the
// replication source back to the poll read uses it with a snapshot taken at
// a WAL position up to which Kafka holds every row, and marks them
// (MarkCommitted) after the snapshot's transaction (relay/switchback.go).
func (s *Store) Unmarked(ctx context.Context, tx pgx.Tx) ([]int64, []time.Time, error) {
	rows, err := tx.Query(ctx, `SELECT id, created_at FROM `+s.t.Ident()+` WHERE published_at IS NULL ORDER BY id`)
	if err != nil {
		return nil, nil, fmt.Errorf("read the unmarked rows of %s: %w", s.t, err)
	}
	defer rows.Close()
	var ids []int64
	var created []time.Time
	for rows.Next() {
		var id int64
		var c time.Time
		if err := rows.Scan(&id, &c); err != nil {
			return nil, nil, fmt.Errorf("read the unmarked rows of %s: %w", s.t, err)
		}
		ids, created = append(ids, id), append(created, c)
	}
	if err := rows.Err(); err != nil {
		return nil, nil, fmt.Errorf("read the unmarked rows of %s: %w", s.t, err)
	}
	return ids, created, nil
}
