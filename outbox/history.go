package outbox

import (
	"context"
	"fmt"

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
