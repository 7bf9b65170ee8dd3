package outbox_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestHeldProbeUsesTheDigestIndex: the read's probe for rows held by a dead
// letter of their key (hold-key) looks the dead letters up in
// <table>_dead_letter_held_digest, the index on the MD5 of topic and key
// (bounded entries, whatever a key's length), in the custom and in the
// generic plan a prepared statement gets after five runs; and keys longer
// than a btree entry can be dead-lettered.
func TestHeldProbeUsesTheDigestIndex(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	st := outbox.NewStore(db.Pool, db.Table)
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox_dead_letter (id, topic, key, value, created_at, error)
SELECT -n, 't', convert_to('key-' || n, 'UTF8'), 'v', now(), 'bad' FROM generate_series(1, 20000) AS n;
INSERT INTO outbox_dead_letter (id, topic, key, value, created_at, error)
SELECT -30000, 't', decode(string_agg(md5(n::text), ''), 'hex'), 'v', now(), 'bad' FROM generate_series(1, 400) AS n;
INSERT INTO outbox (topic, key, value) SELECT 't', convert_to('key-' || n, 'UTF8'), 'v' FROM generate_series(1, 20000) AS n;
ANALYZE outbox; ANALYZE outbox_dead_letter`); err != nil {
		t.Fatal(err)
	}
	for _, plan := range []string{"force_custom_plan", "force_generic_plan"} {
		for _, bounded := range []bool{false, true} {
			args := "1000"
			if bounded {
				args = "1000, 16777"
			}
			for _, q := range []struct{ name, sql, args string }{
				{"read", st.ReadBatchSQL(1, bounded), args},
				{"read skipping the ids in flight", st.ReadSkippingSQL(1, bounded), args + ", '{1,2,3}'"},
				{"read of shard 0 of 2", st.ReadBatchSQL(2, bounded), args + ", 0"},
			} {
				text := explain(t, db, plan, q.sql, q.args)
				if !strings.Contains(text, "outbox_dead_letter_held_digest") {
					t.Errorf("%s, %s, bounded %v: the held probe does not use outbox_dead_letter_held_digest:\n%s", q.name, plan, bounded, text)
				}
			}
		}
	}
}

// explain returns the plan of query, prepared and run with args under
// plan_cache_mode plan.
func explain(t *testing.T, db *testenv.DB, plan, query, args string) string {
	t.Helper()
	ctx := context.Background()
	conn, err := db.Pool.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `SET plan_cache_mode = `+plan); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `PREPARE q AS `+query); err != nil {
		t.Fatal(err)
	}
	defer conn.Exec(ctx, `DEALLOCATE q; RESET plan_cache_mode`) //nolint:errcheck // the connection goes back to the pool
	rows, err := conn.Query(ctx, `EXPLAIN EXECUTE q(`+args+`)`)
	if err != nil {
		t.Fatal(err)
	}
	plans, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(plans, "\n")
}
