package outbox

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
)

// History identifies the database's line of history: its cluster's system
// identifier (new after a restore from a logical dump into another cluster,
// or initdb) and its current timeline (new after every promotion of a
// standby and every point-in-time recovery). A checkpoint records it, so
// that recovery can tell it is reading a database that went another way
// since: a fail-over or a restore.
type History struct {
	SystemID string
	Timeline int32
}

// Known reports whether h was read (checkpoints written before it was
// recorded carry none).
func (h History) Known() bool { return h.SystemID != "" }

// History reads the database's system identifier and current timeline (the
// timeline is the first eight hex digits of the current WAL file's name).
// Both functions are executable by every role.
func (s *Store) History(ctx context.Context) (History, error) {
	var h History
	err := s.pool.QueryRow(ctx, `SELECT system_identifier::text,
    ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int
FROM pg_control_system()`).Scan(&h.SystemID, &h.Timeline)
	if err != nil {
		return h, fmt.Errorf("read the database's system identifier and timeline: %w", err)
	}
	return h, nil
}

// Gone returns the ids of ids that neither the outbox table nor its
// dead-letter table holds.
func (s *Store) Gone(ctx context.Context, ids []int64) ([]int64, error) {
	rows, err := s.pool.Query(ctx, `SELECT c.id FROM unnest($1::bigint[]) AS c(id)
WHERE NOT EXISTS (SELECT FROM `+s.t.Ident()+` o WHERE o.id = c.id)
  AND NOT EXISTS (SELECT FROM `+s.t.DeadLetterIdent()+` d WHERE d.id = c.id)
ORDER BY c.id`, ids)
	if err != nil {
		return nil, fmt.Errorf("look for the checkpoint's rows in %s: %w", s.t, err)
	}
	gone, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("look for the checkpoint's rows in %s: %w", s.t, err)
	}
	return gone, nil
}

// PublishedOf returns which of the rows (by id and created_at) are marked
// published: the replication source's hand-over skips the rows the poll
// read published.
func (s *Store) PublishedOf(ctx context.Context, ids []int64, created []time.Time) (map[int64]bool, error) {
	rows, err := s.pool.Query(ctx, `SELECT o.id FROM `+s.t.Ident()+` o
JOIN unnest($1::bigint[], $2::timestamptz[]) AS c(id, created) ON o.id = c.id AND o.created_at = c.created
WHERE o.published_at IS NOT NULL`, ids, created)
	if err != nil {
		return nil, fmt.Errorf("read the marks of %s: %w", s.t, err)
	}
	marked, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("read the marks of %s: %w", s.t, err)
	}
	out := make(map[int64]bool, len(marked))
	for _, id := range marked {
		out[id] = true
	}
	return out, nil
}

// UnpublishedOf returns which of the rows (by id and created_at) are still
// in the table and not marked published: the rows the replication source's
// hand-over publishes from the stream. A row the poll read published is
// either marked or, once retention (or an operator) deleted it, gone; a
// row dead-lettered is gone too. Reading the marks alone would take a
// published row whose mark was deleted for an unpublished one.
func (s *Store) UnpublishedOf(ctx context.Context, ids []int64, created []time.Time) (map[int64]bool, error) {
	rows, err := s.pool.Query(ctx, `SELECT o.id FROM `+s.t.Ident()+` o
JOIN unnest($1::bigint[], $2::timestamptz[]) AS c(id, created) ON o.id = c.id AND o.created_at = c.created
WHERE o.published_at IS NULL`, ids, created)
	if err != nil {
		return nil, fmt.Errorf("read the unpublished rows of %s: %w", s.t, err)
	}
	unpublished, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("read the unpublished rows of %s: %w", s.t, err)
	}
	out := make(map[int64]bool, len(unpublished))
	for _, id := range unpublished {
		out[id] = true
	}
	return out, nil
}
