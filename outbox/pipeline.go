package outbox

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
)

// ReadBatchAfter is ReadBatch restricted to rows with an id above after: the
// read of a pipelined publish loop while the mark of its previous batch is
// still in flight. Those rows are committed in Kafka but not yet marked, so
// ReadBatch would return them again; reading above the last id of that batch
// skips them and keeps the shard's id order (I4), without walking their index
// entries. Keep its filter in step with ReadBatch's: it is the same query
// with one more condition.
func (s *Store) ReadBatchAfter(ctx context.Context, shard, shards, limit int, maxBytes int64, after int64) ([]Row, error) {
	args := []any{limit, after}
	filter, fargs := shardFilter(shard, shards, 3)
	q := `SELECT id, topic, key, value, headers::text, partition, created_at FROM ` + s.t.Ident() +
		` WHERE published_at IS NULL AND id > $2` + filter + ` ORDER BY id LIMIT $1`
	if maxBytes > 0 {
		args = append(args, maxBytes)
		filter, fargs = shardFilter(shard, shards, 4)
		q = `SELECT id, topic, key, value, headers, partition, created_at FROM (
    SELECT *, row_number() OVER w AS n,
        sum(coalesce(octet_length(key), 0) + coalesce(octet_length(value), 0) + coalesce(octet_length(headers), 0)) OVER w AS upto
    FROM (SELECT id, topic, key, value, headers::text AS headers, partition, created_at FROM ` + s.t.Ident() +
			` WHERE published_at IS NULL AND id > $2` + filter + ` ORDER BY id LIMIT $1) AS candidates
    WINDOW w AS (ORDER BY id ROWS UNBOUNDED PRECEDING)
) AS batch WHERE n = 1 OR upto <= $3 ORDER BY id`
	}
	rows, err := s.pool.Query(ctx, q, append(args, fargs...)...)
	if err != nil {
		return nil, fmt.Errorf("read unpublished rows of %s after id %d: %w", s.t, after, err)
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
		return nil, fmt.Errorf("read unpublished rows of %s after id %d: %w", s.t, after, err)
	}
	return out, nil
}
