package loadtest

import (
	"bytes"
	"context"
	"errors"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// smallRun is a bench run of a few seconds on a fresh database and a kfake
// cluster over TCP (or KAFKA_BROKERS).
func smallRun(t *testing.T) (Config, string, []string) {
	t.Helper()
	dbURL := testenv.CreateDatabase(t)
	k := testenv.NewKafka(t, 3)
	cfg, err := relay.LoadConfig([]string{"OUTBOX_DATABASE_URL=" + dbURL, "OUTBOX_KAFKA_BROKERS=" + strings.Join(k.Brokers, ",")})
	if err != nil {
		t.Fatal(err)
	}
	return Config{
		Relay: cfg, Rows: 2000, RowBytes: 100, Batch: 500, Shards: 2, Delivery: "exactly-once", Rounds: 1,
		OnPublish: outbox.Mark, Rate: 200, LatencyDuration: 500 * time.Millisecond,
	}, dbURL, k.Brokers
}

// TestAFailureInTheMiddleLeavesNothingBehind: a step fails after the relay
// drained the scratch table (so the checkpoint topic holds records and the
// table a recorded relay identity): the error is returned and the scratch
// schema and topics are removed.
func TestAFailureInTheMiddleLeavesNothingBehind(t *testing.T) {
	c, dbURL, brokers := smallRun(t)
	boom := errors.New("injected failure")
	var out bytes.Buffer
	c.Out = &out
	c.hook = func(step string) error {
		if step == "relay" {
			return boom
		}
		return nil
	}
	rep, err := Run(context.Background(), c)
	if !errors.Is(err, boom) {
		t.Fatalf("Run returned %v, want the injected failure\n%s", err, out.String())
	}
	if rep == nil || !rep.Removed || !strings.Contains(out.String(), "removed schema") {
		t.Fatalf("the scratch objects were not reported removed:\n%s", out.String())
	}
	testenv.RequireNoBenchScratchLeft(t, dbURL, brokers)
}

// TestCtrlCCleansUp: the context is cancelled (Ctrl-C) while a round runs;
// Run stops with the cancellation and still removes the scratch objects,
// with a context of its own.
func TestCtrlCCleansUp(t *testing.T) {
	c, dbURL, brokers := smallRun(t)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	c.hook = func(step string) error {
		if step == "load" {
			cancel()
		}
		return nil
	}
	rep, err := Run(ctx, c)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v, want context.Canceled", err)
	}
	if rep == nil || !rep.Removed {
		t.Fatal("the scratch objects were not reported removed")
	}
	testenv.RequireNoBenchScratchLeft(t, dbURL, brokers)
}

// TestRefusesClearlyWithoutTheCreatePrivilege: a database user that may not
// create a schema gets an error naming OUTBOX_DATABASE_URL and the grant
// that fixes it, and nothing is left.
func TestRefusesClearlyWithoutTheCreatePrivilege(t *testing.T) {
	c, dbURL, brokers := smallRun(t)
	ctx := context.Background()
	role := testenv.RandomName("bench_nocreate_")
	admin, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer admin.Close(ctx)
	// Registered first, so it runs last: the shared server keeps no role of
	// this test.
	t.Cleanup(func() {
		c, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			t.Errorf("check that role %s is gone: %v", role, err)
			return
		}
		defer c.Close(ctx)
		var left bool
		if err := c.QueryRow(ctx, `SELECT EXISTS (SELECT FROM pg_roles WHERE rolname = $1)`, role).Scan(&left); err != nil || left {
			t.Errorf("role %s is left on the server (%v)", role, err)
		}
	})
	if _, err := admin.Exec(ctx, `CREATE ROLE `+role+` LOGIN`); err != nil {
		t.Fatal(err)
	}
	// On a connection of its own: admin is closed by the time cleanups run.
	t.Cleanup(func() {
		c, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			t.Errorf("drop role %s: %v", role, err)
			return
		}
		defer c.Close(ctx)
		if _, err := c.Exec(ctx, `DROP ROLE IF EXISTS `+role); err != nil {
			t.Errorf("drop role %s: %v", role, err)
		}
	})
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.User(role)
	c.Relay.DatabaseURL = u.String()
	_, err = Run(ctx, c)
	if err == nil || !strings.Contains(err.Error(), "CREATE privilege") || !strings.Contains(err.Error(), "OUTBOX_DATABASE_URL") || !strings.Contains(err.Error(), "GRANT CREATE ON DATABASE") {
		t.Fatalf("Run without the CREATE privilege returned %v", err)
	}
	testenv.RequireNoBenchScratchLeft(t, dbURL, brokers)
}

// TestCeilingLoopsDrainEveryRowOfEveryShard: the database-only loops mark
// (or delete) every loaded row once, with one shard or several.
func TestCeilingLoopsDrainEveryRowOfEveryShard(t *testing.T) {
	db := testenv.NewDB(t)
	ctx := context.Background()
	for _, tc := range []struct {
		on     outbox.OnPublish
		shards int
	}{{outbox.Mark, 1}, {outbox.Mark, 3}, {outbox.Delete, 1}, {outbox.Delete, 3}} {
		if err := Load(ctx, db.Pool, db.Table, "bench", 2500, 50); err != nil {
			t.Fatal(err)
		}
		_, n, err := DrainCeiling(ctx, db.Pool, db.Table, 300, tc.shards, tc.on)
		if err != nil {
			t.Fatal(err)
		}
		left, all := count(t, db.Pool, `published_at IS NULL`), count(t, db.Pool, `true`)
		want := 2500
		if tc.on == outbox.Delete {
			want = 0
		}
		if n != 2500 || left != 0 || all != want {
			t.Errorf("%s, %d shards: drained %d rows, %d left unpublished, %d in the table (want 2500, 0, %d)", tc.on, tc.shards, n, left, all, want)
		}
	}
}

func count(t *testing.T, pool *pgxpool.Pool, where string) int {
	t.Helper()
	var n int
	if err := pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE `+where).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}
