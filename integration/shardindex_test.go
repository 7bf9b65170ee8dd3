package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// explainRead returns the plan of the relay's read of one shard (both the
// plain and the byte-bounded statement), as a custom plan (the first five
// executions of a prepared statement) or as the generic plan PostgreSQL may
// switch to after them, with the shard still a parameter.
func explainRead(t *testing.T, db *testenv.DB, shards int, bounded, generic bool) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, db.URL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	mode := "force_custom_plan"
	if generic {
		mode = "force_generic_plan"
	}
	q := outbox.NewStore(db.Pool, db.Table).ReadBatchSQL(shards, bounded)
	args := "500, 2"
	if bounded {
		args = "500, 16777, 2"
	}
	if _, err := conn.Exec(ctx, `SET plan_cache_mode = `+mode); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, `PREPARE read AS `+q); err != nil {
		t.Fatalf("prepare %s: %v", q, err)
	}
	rows, err := conn.Query(ctx, `EXPLAIN EXECUTE read(`+args+`)`)
	if err != nil {
		t.Fatal(err)
	}
	lines, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	return strings.Join(lines, "\n")
}

// idxScans is how many scans pg_stat_user_indexes counts for index name.
func idxScans(t *testing.T, db *testenv.DB, name string) int64 {
	t.Helper()
	var n int64
	if err := db.Pool.QueryRow(context.Background(), `SELECT coalesce((SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelname = $1), -1)`, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestReshardBuildsTheShardIndexAndTheShardReadUsesIt: reshard to 4 shards
// builds <table>_shards4_idx; EXPLAIN of each shard's read (plain and byte
// bounded, custom and generic plan) uses it, and so do the relay's own
// reads through pgx's statement cache beyond the five custom plans (counted
// by pg_stat_user_indexes), never the walk of the whole unpublished index.
// Four shards then deliver every row, keyed and keyless, exactly once.
// Reshard back to 1 drops the index.
func TestReshardBuildsTheShardIndexAndTheShardReadUsesIt(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "payments")
	keys := []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"}
	ids := append(db.Insert(t, "payments", 3000, keys), db.Insert(t, "payments", 1000, nil)...)

	cfg := testenv.RelayConfig(db, k)
	one, err := relay.New(cfg, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := one.Reshard(ctx); err != nil { // records one shard
		t.Fatal(err)
	}
	cfg.Shards = 4
	rs, err := relay.New(cfg, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if old, err := rs.Reshard(ctx); err != nil || old.Shards != 1 {
		t.Fatalf("reshard to 4: old %d shards, %v", old.Shards, err)
	}
	name := db.Table.ShardIndexName(4)
	if ok, err := outbox.HasShardIndex(ctx, db.Pool, db.Table, 4); err != nil || !ok {
		t.Fatalf("after reshard to 4, %s is not a valid index (%v)", name, err)
	}
	if _, err := db.Pool.Exec(ctx, `ANALYZE outbox`); err != nil {
		t.Fatal(err)
	}
	for _, bounded := range []bool{false, true} {
		for _, generic := range []bool{false, true} {
			plan := explainRead(t, db, 4, bounded, generic)
			t.Logf("read of shard 2 of 4 (bounded %v, generic plan %v):\n%s", bounded, generic, plan)
			if !strings.Contains(plan, name) || strings.Contains(plan, "outbox_unpublished_idx") {
				t.Fatalf("read of a shard (bounded %v, generic plan %v) does not use %s:\n%s", bounded, generic, name, plan)
			}
			if generic && !strings.Contains(plan, "$") {
				t.Fatalf("the generic plan has no parameter: the shard must stay one\n%s", plan)
			}
		}
	}

	// The relay's own reads, prepared and cached by pgx: more than five
	// executions of each statement, so PostgreSQL may choose a generic plan.
	st := outbox.NewStore(db.Pool, db.Table)
	beforeShard, beforeAll := idxScans(t, db, name), idxScans(t, db, "outbox_unpublished_idx")
	const reads = 4 * 2 * 8
	got := map[int64]bool{}
	for range 8 {
		for shard := range 4 {
			for _, maxBytes := range []int64{0, 16 << 20} {
				rows, err := st.ReadBatch(ctx, shard, 4, 200, maxBytes)
				if err != nil {
					t.Fatal(err)
				}
				if len(rows) != 200 {
					t.Fatalf("shard %d: read %d rows, want 200", shard, len(rows))
				}
				for _, r := range rows {
					got[r.ID] = true
				}
			}
		}
	}
	if len(got) != 4*200 {
		t.Fatalf("the four shards' first batches hold %d distinct rows, want 800: shards overlap", len(got))
	}
	deadline := time.Now().Add(10 * time.Second)
	for idxScans(t, db, name) < beforeShard+reads && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond) // statistics reach pg_stat within a second of going idle
	}
	if n := idxScans(t, db, name) - beforeShard; n < reads {
		t.Fatalf("%d scans of %s for %d shard reads", n, name, reads)
	}
	if n := idxScans(t, db, "outbox_unpublished_idx") - beforeAll; n != 0 {
		t.Fatalf("%d scans of outbox_unpublished_idx during %d shard reads: a read walked every unpublished row", n, reads)
	}

	logs := &testenv.SyncBuffer{}
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)))
	more := db.Insert(t, "payments", 500, keys)
	all := append(ids, more...)
	seen := k.NewConsumer(t, "payments").WaitFor(t, len(all), 60*time.Second)
	testenv.CheckExactlyOnce(t, all, seen)
	testenv.CheckKeyOrder(t, seen)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(logs.String(), "no index serves the shard filter") {
		t.Fatalf("the relay warned of a missing shard index that is there")
	}

	cfg.Shards = 1
	back, err := relay.New(cfg, db.Pool, relay.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	if old, err := back.Reshard(ctx); err != nil || old.Shards != 4 {
		t.Fatalf("reshard back to 1: old %d shards, %v", old.Shards, err)
	}
	if left, err := outbox.ShardIndexes(ctx, db.Pool, db.Table); err != nil || len(left) != 0 {
		t.Fatalf("after reshard to 1 shard indexes are left: %v (%v)", left, err)
	}
}

// TestShardsWithoutTheShardIndexStillDeliverAndWarn: four shards on a table
// without the shard index (no reshard ran: the first relay recorded the
// count) deliver every row exactly once, and the relay says at start which
// statement and which command build the index. An invalid index left by an
// interrupted build counts as missing, and CreateShardIndex replaces it.
func TestShardsWithoutTheShardIndexStillDeliverAndWarn(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 4, "payments")
	keys := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	ids := append(db.Insert(t, "payments", 300, keys), db.Insert(t, "payments", 100, nil)...)
	cfg := testenv.RelayConfig(db, k)
	cfg.Shards = 4
	logs := &testenv.SyncBuffer{}
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)))
	seen := k.NewConsumer(t, "payments").WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	testenv.CheckKeyOrder(t, seen)
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"no index serves the shard filter", "outbox-relay migrate up", `CREATE INDEX CONCURRENTLY IF NOT EXISTS \"outbox_shards4_idx\"`} {
		if !strings.Contains(logs.String(), want) {
			t.Fatalf("the relay's start-up log does not say %q", want)
		}
	}

	// An index whose build failed is invalid: not used, so still missing.
	if _, err := db.Pool.Exec(ctx, db.Table.ShardIndexSQL(4)); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `UPDATE pg_index SET indisvalid = false WHERE indexrelid = 'outbox_shards4_idx'::regclass`); err != nil {
		t.Fatal(err)
	}
	if ok, err := outbox.HasShardIndex(ctx, db.Pool, db.Table, 4); err != nil || ok {
		t.Fatalf("an invalid shard index counts as present (%v)", err)
	}
	if built, err := outbox.CreateShardIndex(ctx, db.Pool, db.Table, 4); err != nil || !built {
		t.Fatalf("CreateShardIndex over an invalid index: built %v, %v", built, err)
	}
	if ok, err := outbox.HasShardIndex(ctx, db.Pool, db.Table, 4); err != nil || !ok {
		t.Fatalf("after CreateShardIndex the shard index is not valid (%v)", err)
	}
}
