package outbox

import (
	"context"
	"fmt"
	"regexp"
	"strconv"

	"github.com/jackc/pgx/v5"
)

// shardExpr is the shard of a row of a table split into shards (> 1)
// shards: the hash of its key modulo shards, keyless rows by id. The count is
// a literal, so that the expression is the same text in the index
// (ShardIndexSQL) and in every query (shardFilter): PostgreSQL uses an
// expression index only for the same expression, constants included.
func shardExpr(shards int) string {
	n := strconv.Itoa(shards)
	return `(CASE WHEN key IS NULL THEN id % ` + n + ` ELSE (hashtextextended(encode(key, 'hex'), 0) % ` + n + ` + ` + n + `) % ` + n + ` END)`
}

// ShardIndexName is the name, unquoted, of the index that serves the shard
// filter of a table split into shards shards: "<table>_shards<N>_idx".
func (t Table) ShardIndexName(shards int) string {
	return t.Name + "_shards" + strconv.Itoa(shards) + "_idx"
}

// shardIndexNames matches the names of the table's shard indexes, of any
// shard count (the table's name is a prefix that the caller checks).
var shardIndexNames = regexp.MustCompile(`_shards([0-9]+)_idx$`)

// ShardIndexSQL is the statement that creates the index serving the shard
// filter of a table split into shards (> 1) shards: partial on unpublished
// rows like the table's own unpublished index, keyed by the row's shard and
// then its id, so that one shard's read is one ordered range of the index
// instead of a walk of every unpublished row that filters each by hash.
// CONCURRENTLY: writers are not blocked while it is built, and it cannot
// run inside a transaction block.
func (t Table) ShardIndexSQL(shards int) string {
	return `CREATE INDEX CONCURRENTLY IF NOT EXISTS ` + quoteIdent(t.Name+"_shards"+strconv.Itoa(shards)+"_idx") + ` ON ` + t.Ident() +
		` (` + shardExpr(shards) + `, id) WHERE published_at IS NULL`
}

// DDL is what the shard index statements need of a connection: *pgx.Conn
// and *pgxpool.Pool fit (never a pgx.Tx: CONCURRENTLY refuses a
// transaction block).
type DDL interface {
	Execer
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
}

// ShardIndex is one shard index of a table, as the catalog has it.
type ShardIndex struct {
	Name   string
	Shards int
	// Valid is false for an index whose CREATE INDEX CONCURRENTLY failed
	// or is still running: PostgreSQL does not use it.
	Valid bool
}

// ShardIndexes lists the table's shard indexes (of any shard count).
func ShardIndexes(ctx context.Context, db DDL, t Table) ([]ShardIndex, error) {
	rows, err := db.Query(ctx, `SELECT c.relname, i.indisvalid FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid
WHERE i.indrelid = to_regclass($1) AND starts_with(c.relname, $2) ORDER BY c.relname`, t.Ident(), t.Name+"_shards")
	if err != nil {
		return nil, fmt.Errorf("list shard indexes of %s: %w", t, err)
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (ShardIndex, error) {
		var x ShardIndex
		err := r.Scan(&x.Name, &x.Valid)
		return x, err
	})
	if err != nil {
		return nil, fmt.Errorf("list shard indexes of %s: %w", t, err)
	}
	var out []ShardIndex
	for _, x := range all {
		m := shardIndexNames.FindStringSubmatch(x.Name)
		if m == nil || x.Name != t.ShardIndexName(atoi(m[1])) {
			continue
		}
		x.Shards = atoi(m[1])
		out = append(out, x)
	}
	return out, nil
}

func atoi(s string) int {
	n, _ := strconv.Atoi(s)
	return n
}

// HasShardIndex reports whether the table has a valid index serving the
// shard filter of shards shards (always true for one shard, which has no
// filter).
func HasShardIndex(ctx context.Context, db DDL, t Table, shards int) (bool, error) {
	if shards <= 1 {
		return true, nil
	}
	all, err := ShardIndexes(ctx, db, t)
	if err != nil {
		return false, err
	}
	for _, x := range all {
		if x.Shards == shards && x.Valid {
			return true, nil
		}
	}
	return false, nil
}

// CreateShardIndex creates the index serving the shard filter of shards
// shards (ShardIndexSQL) unless a valid one exists, and reports whether it
// built one. An invalid one (left by a failed or interrupted CREATE INDEX
// CONCURRENTLY) is dropped and built again. It builds without blocking
// writers, but waits for the transactions open on the table when it starts
// and scans the table twice, so it takes a while on a large table. It does
// nothing for one shard.
func CreateShardIndex(ctx context.Context, db DDL, t Table, shards int) (bool, error) {
	if shards <= 1 {
		return false, nil
	}
	all, err := ShardIndexes(ctx, db, t)
	if err != nil {
		return false, err
	}
	for _, x := range all {
		if x.Shards != shards {
			continue
		}
		if x.Valid {
			return false, nil
		}
		if err := dropShardIndex(ctx, db, t, x.Name); err != nil {
			return false, err
		}
	}
	if _, err := db.Exec(ctx, t.ShardIndexSQL(shards)); err != nil {
		return false, fmt.Errorf("create the shard index of %s for %d shards (%s): %w", t, shards, t.ShardIndexSQL(shards), err)
	}
	return true, nil
}

// DropShardIndexes drops the table's shard indexes of every shard count but
// keep (after a reshard: they serve no query), and returns their names.
func DropShardIndexes(ctx context.Context, db DDL, t Table, keep int) ([]string, error) {
	all, err := ShardIndexes(ctx, db, t)
	if err != nil {
		return nil, err
	}
	var dropped []string
	for _, x := range all {
		if x.Shards == keep && keep > 1 {
			continue
		}
		if err := dropShardIndex(ctx, db, t, x.Name); err != nil {
			return dropped, err
		}
		dropped = append(dropped, x.Name)
	}
	return dropped, nil
}

func dropShardIndex(ctx context.Context, db DDL, t Table, name string) error {
	if _, err := db.Exec(ctx, `DROP INDEX CONCURRENTLY IF EXISTS `+quoteIdent(t.Schema)+`.`+quoteIdent(name)); err != nil {
		return fmt.Errorf("drop shard index %s of %s: %w", name, t, err)
	}
	return nil
}
