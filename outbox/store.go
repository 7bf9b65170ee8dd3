package outbox

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"fmt"
	"slices"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Row is one outbox row as the relay reads it.
type Row struct {
	ID        int64
	Topic     string
	Key       []byte
	Value     []byte // nil: a tombstone
	Headers   []byte // the jsonb text, nil when NULL
	Partition *int32
	CreatedAt time.Time
}

// Store runs the relay's queries on one outbox table.
type Store struct {
	pool *pgxpool.Pool
	t    Table
}

// NewStore returns the relay's view of table t.
func NewStore(pool *pgxpool.Pool, t Table) *Store { return &Store{pool: pool, t: t} }

// Table is the table the store reads.
func (s *Store) Table() Table { return s.t }

// WakeChannel is the LISTEN channel the insert trigger notifies:
// "outbox_" followed by the MD5 of "<schema>.<table>" (unquoted).
func (t Table) WakeChannel() string {
	sum := md5.Sum([]byte(t.Schema + "." + t.Name))
	return "outbox_" + hex.EncodeToString(sum[:])
}

// shardFilter restricts a query to the rows of one shard when there are
// several: rows map to shards by a hash of their key, keyless rows by id.
// I4: every row of one key lands in the same shard.
func shardFilter(shard, shards int, argN int) (string, []any) {
	if shards <= 1 {
		return "", nil
	}
	n := strconv.Itoa(argN)
	return ` AND (CASE WHEN key IS NULL THEN id % $` + n + ` ELSE (hashtextextended(encode(key, 'hex'), 0) % $` + n + ` + $` + n + `) % $` + n + ` END) = $` + strconv.Itoa(argN+1),
		[]any{int64(shards), int64(shard)}
}

// ReadBatch returns unpublished rows of one shard in id order: at most limit
// rows, and, when maxBytes > 0, no more than maxBytes of key, value and
// headers (as JSON text) in all, but always at least the first row, so that a
// single row larger than maxBytes is still read, on its own.
//
// It is one query: the sizes are octet_length of the candidate rows' columns,
// which PostgreSQL reads from a stored value's header without fetching
// (detoasting) it, and only the rows before the cut are sent.
func (s *Store) ReadBatch(ctx context.Context, shard, shards, limit int, maxBytes int64) ([]Row, error) {
	args := []any{limit}
	filter, fargs := shardFilter(shard, shards, 2)
	q := `SELECT id, topic, key, value, headers::text, partition, created_at FROM ` + s.t.Ident() +
		` WHERE published_at IS NULL` + filter + ` ORDER BY id LIMIT $1`
	if maxBytes > 0 {
		args = append(args, maxBytes)
		filter, fargs = shardFilter(shard, shards, 3)
		q = `SELECT id, topic, key, value, headers, partition, created_at FROM (
    SELECT *, row_number() OVER w AS n,
        sum(coalesce(octet_length(key), 0) + coalesce(octet_length(value), 0) + coalesce(octet_length(headers), 0)) OVER w AS upto
    FROM (SELECT id, topic, key, value, headers::text AS headers, partition, created_at FROM ` + s.t.Ident() +
			` WHERE published_at IS NULL` + filter + ` ORDER BY id LIMIT $1) AS candidates
    WINDOW w AS (ORDER BY id ROWS UNBOUNDED PRECEDING)
) AS batch WHERE n = 1 OR upto <= $2 ORDER BY id`
	}
	rows, err := s.pool.Query(ctx, q, append(args, fargs...)...)
	if err != nil {
		return nil, fmt.Errorf("read unpublished rows of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Row, error) {
		var row Row
		var headers *string
		err := r.Scan(&row.ID, &row.Topic, &row.Key, &row.Value, &headers, &row.Partition, &row.CreatedAt)
		if headers != nil {
			row.Headers = []byte(*headers)
		}
		return row, err
	})
	if err != nil {
		return nil, fmt.Errorf("read unpublished rows of %s: %w", s.t, err)
	}
	return out, nil
}

// MarkPublished sets published_at on the rows whose ids are given and that
// are not yet marked, and returns how many it marked. It is idempotent, so
// recovery can apply a checkpoint any number of times.
func (s *Store) MarkPublished(ctx context.Context, ids []int64) (int64, error) {
	if len(ids) == 0 {
		return 0, nil
	}
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.t.Ident()+` SET published_at = now() WHERE id = ANY($1::bigint[]) AND published_at IS NULL`, ids)
	if err != nil {
		return 0, fmt.Errorf("mark %d rows published in %s: %w", len(ids), s.t, err)
	}
	return tag.RowsAffected(), nil
}

// MarkInflight is at-most-once's mark: in one transaction it marks ids
// published and records the ones it marked as an in-flight batch of the
// shard, before the batch is produced. It returns the ids it marked (rows
// already marked, by another relay that still thinks it owns the shard, are
// not) and the in-flight batch to confirm once sent. Every batch is a row of
// its own, so a batch an old owner marked and never sent is still there after
// a new owner confirmed its own.
func (s *Store) MarkInflight(ctx context.Context, shard int, ids []int64) (marked []int64, batch int64, err error) {
	err = pgx.BeginFunc(ctx, s.pool, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `UPDATE `+s.t.Ident()+` SET published_at = now() WHERE id = ANY($1::bigint[]) AND published_at IS NULL RETURNING id`, ids)
		if err != nil {
			return err
		}
		if marked, err = pgx.CollectRows(rows, pgx.RowTo[int64]); err != nil {
			return err
		}
		slices.Sort(marked)
		return tx.QueryRow(ctx, `INSERT INTO `+s.t.InflightIdent()+` (shard, ids) VALUES ($1, $2) RETURNING batch`, shard, marked).Scan(&batch)
	})
	if err != nil {
		return nil, 0, fmt.Errorf("mark %d rows published before sending (at-most-once) in %s: %w", len(ids), s.t, err)
	}
	return marked, batch, nil
}

// ConfirmInflight removes the in-flight record of a batch whose send has
// ended (sent, or its loss reported).
func (s *Store) ConfirmInflight(ctx context.Context, batch int64) error {
	if _, err := s.pool.Exec(ctx, `DELETE FROM `+s.t.InflightIdent()+` WHERE batch = $1`, batch); err != nil {
		return fmt.Errorf("confirm in-flight batch %d of %s: %w", batch, s.t, err)
	}
	return nil
}

// TakeInflight removes and returns the ids of every in-flight at-most-once
// batch of the shard, in id order: rows marked published whose send was
// never confirmed (recovery reports them lost).
func (s *Store) TakeInflight(ctx context.Context, shard int) ([]int64, error) {
	rows, err := s.pool.Query(ctx, `WITH taken AS (DELETE FROM `+s.t.InflightIdent()+` WHERE shard = $1 RETURNING ids)
SELECT id FROM taken, unnest(taken.ids) AS id ORDER BY id`, shard)
	if err != nil {
		return nil, fmt.Errorf("read in-flight batches of shard %d of %s: %w", shard, s.t, err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("read in-flight batches of shard %d of %s: %w", shard, s.t, err)
	}
	return ids, nil
}

// DeadLetter is a row that cannot be published and the reason.
type DeadLetter struct {
	ID    int64
	Error string
}

// MoveToDeadLetter moves unpublished rows to the dead-letter table with their
// errors, in one transaction: a row leaves the outbox only as it enters the
// dead-letter table, so none is lost. Rows already published or already
// moved are left alone. It returns how many rows it moved.
func (s *Store) MoveToDeadLetter(ctx context.Context, dead []DeadLetter) (int64, error) {
	if len(dead) == 0 {
		return 0, nil
	}
	ids := make([]int64, len(dead))
	errs := make([]string, len(dead))
	for i, d := range dead {
		ids[i], errs[i] = d.ID, d.Error
	}
	q := `WITH bad AS (
    SELECT * FROM unnest($1::bigint[], $2::text[]) AS b(id, error)
), moved AS (
    DELETE FROM ` + s.t.Ident() + ` o USING bad
    WHERE o.id = bad.id AND o.published_at IS NULL
    RETURNING o.id, o.topic, o.key, o.value, o.headers, o.partition, o.created_at, bad.error
)
INSERT INTO ` + s.t.DeadLetterIdent() + ` (id, topic, key, value, headers, partition, created_at, error)
SELECT * FROM moved`
	tag, err := s.pool.Exec(ctx, q, ids, errs)
	if err != nil {
		return 0, fmt.Errorf("move %d rows of %s to the dead-letter table: %w", len(dead), s.t, err)
	}
	return tag.RowsAffected(), nil
}

// Incarnation returns the identity of this outbox table, created with it by
// the first migration. Checkpoints carry it, so that a checkpoint written for
// another table (or for this one before it was dropped and created again) is
// never applied.
func (s *Store) Incarnation(ctx context.Context) (string, error) {
	var id string
	if err := s.pool.QueryRow(ctx, `SELECT incarnation::text FROM `+s.t.StateIdent()).Scan(&id); err != nil {
		return "", fmt.Errorf("read incarnation of %s: %w", s.t, err)
	}
	return id, nil
}

// Shards returns the shard count recorded for the table, recording n first
// if none is recorded yet.
func (s *Store) Shards(ctx context.Context, n int) (int, error) {
	var stored int
	err := s.pool.QueryRow(ctx, `UPDATE `+s.t.StateIdent()+` SET shards = coalesce(shards, $1) RETURNING shards`, n).Scan(&stored)
	if err != nil {
		return 0, fmt.Errorf("read shard count of %s: %w", s.t, err)
	}
	return stored, nil
}

// SetShards records a new shard count (after a reshard).
func (s *Store) SetShards(ctx context.Context, n int) error {
	if _, err := s.pool.Exec(ctx, `UPDATE `+s.t.StateIdent()+` SET shards = $1`, n); err != nil {
		return fmt.Errorf("record shard count of %s: %w", s.t, err)
	}
	return nil
}

// Backlog is the unpublished part of one shard.
type Backlog struct {
	Rows         int64
	OldestCreate time.Time // zero when Rows is 0
}

// Backlog counts the unpublished rows of one shard and finds the oldest.
func (s *Store) Backlog(ctx context.Context, shard, shards int) (Backlog, error) {
	filter, fargs := shardFilter(shard, shards, 1)
	var b Backlog
	var oldest *time.Time
	err := s.pool.QueryRow(ctx, `SELECT count(*), min(created_at) FROM `+s.t.Ident()+
		` WHERE published_at IS NULL`+filter, fargs...).Scan(&b.Rows, &oldest)
	if err != nil {
		return Backlog{}, fmt.Errorf("measure backlog of %s: %w", s.t, err)
	}
	if oldest != nil {
		b.OldestCreate = *oldest
	}
	return b, nil
}

// DeletePublished deletes up to limit rows published before cutoff and
// returns how many it deleted (retention).
func (s *Store) DeletePublished(ctx context.Context, cutoff time.Time, limit int) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM `+s.t.Ident()+` WHERE id IN (SELECT id FROM `+s.t.Ident()+
		` WHERE published_at IS NOT NULL AND published_at < $1 ORDER BY published_at LIMIT $2)`, cutoff, limit)
	if err != nil {
		return 0, fmt.Errorf("delete published rows of %s: %w", s.t, err)
	}
	return tag.RowsAffected(), nil
}

// DeadRow is a row of the dead-letter table.
type DeadRow struct {
	Row
	Error    string
	FailedAt time.Time
}

// ListDeadLetters returns up to limit dead letters, oldest first.
func (s *Store) ListDeadLetters(ctx context.Context, limit int) ([]DeadRow, error) {
	rows, err := s.pool.Query(ctx, `SELECT id, topic, key, value, headers::text, partition, created_at, error, failed_at FROM `+
		s.t.DeadLetterIdent()+` ORDER BY id LIMIT $1`, limit)
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeadRow, error) {
		var d DeadRow
		var headers *string
		err := r.Scan(&d.ID, &d.Topic, &d.Key, &d.Value, &headers, &d.Partition, &d.CreatedAt, &d.Error, &d.FailedAt)
		if headers != nil {
			d.Headers = []byte(*headers)
		}
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", s.t, err)
	}
	return out, nil
}

// Requeue moves dead letters back into the outbox as new rows (new ids, so
// they are published after everything already written) and returns the new
// ids, in the order of the given ids that existed.
func (s *Store) Requeue(ctx context.Context, ids []int64) ([]int64, error) {
	rows, err := s.pool.Query(ctx, `WITH moved AS (
    DELETE FROM `+s.t.DeadLetterIdent()+` WHERE id = ANY($1::bigint[])
    RETURNING id, topic, key, value, headers, partition
)
INSERT INTO `+s.t.Ident()+` (topic, key, value, headers, partition)
SELECT topic, key, value, headers, partition FROM moved ORDER BY id
RETURNING id`, ids)
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
	}
	return out, nil
}
