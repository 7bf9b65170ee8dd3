package migrations_test

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

func pool(t *testing.T) *pgxpool.Pool {
	t.Helper()
	p, err := pgxpool.New(context.Background(), testenv.CreateDatabase(t))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	return p
}

// TestConcurrentMigrationsApplyOnce runs Up from eight goroutines (each its
// own connection) at once: the advisory lock makes exactly one apply version
// 1, and the others find nothing to do.
func TestConcurrentMigrationsApplyOnce(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	var wg sync.WaitGroup
	applied := make(chan int, 8)
	errs := make(chan error, 8)
	for range 8 {
		wg.Go(func() {
			m, err := migrations.New(p, "public", "outbox")
			if err != nil {
				errs <- err
				return
			}
			ran, err := m.Up(ctx)
			if err != nil {
				errs <- err
				return
			}
			applied <- len(ran)
		})
	}
	wg.Wait()
	close(applied)
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent Up: %v", err)
	}
	total := 0
	for n := range applied {
		total += n
	}
	m, _ := migrations.New(p, "public", "outbox")
	all, _ := m.All()
	if total != len(all) {
		t.Fatalf("migrations applied %d times in all, want %d (each once)", total, len(all))
	}
	pending, err := m.Pending(ctx)
	if err != nil || pending != 0 {
		t.Fatalf("pending after Up: %d, %v", pending, err)
	}
}

// TestCustomNamesAreQuotedIdentifiers migrates a schema and table whose names
// need quoting, writes and reads a row through them, and checks that the
// default table is untouched.
func TestCustomNamesAreQuotedIdentifiers(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	schema, table := `Pay "ments"`, `Out-Box`
	m, err := migrations.New(p, schema, table)
	if err != nil {
		t.Fatal(err)
	}
	st, err := m.Status(ctx)
	if err != nil || len(st) == 0 || !st[0].AppliedAt.IsZero() {
		t.Fatalf("status before Up: %+v %v", st, err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatal(err)
	}
	tbl := outbox.Table{Schema: schema, Name: table}
	if err := tbl.Write(ctx, p, outbox.Message{Topic: "t", Value: []byte("v")}); err != nil {
		t.Fatal(err)
	}
	rows, err := outbox.NewStore(p, tbl).ReadBatch(ctx, 0, 1, 10, 1<<20)
	if err != nil || len(rows) != 1 {
		t.Fatalf("read back: %v %v", rows, err)
	}
	var exists bool
	if err := p.QueryRow(ctx, `SELECT to_regclass('public.outbox') IS NOT NULL`).Scan(&exists); err != nil || exists {
		t.Fatalf("public.outbox exists=%v (%v): custom names must not create the default table", exists, err)
	}
	// The trigger of the custom table notifies its own channel.
	conn, err := p.Acquire(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Release()
	if _, err := conn.Exec(ctx, `LISTEN `+migrations.QuoteIdent(tbl.WakeChannel())); err != nil {
		t.Fatal(err)
	}
	if err := tbl.Write(ctx, p, outbox.Message{Topic: "t"}); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Conn().WaitForNotification(ctx); err != nil {
		t.Fatalf("no wake-up notification on %s: %v", tbl.WakeChannel(), err)
	}
}

// TestHostileNamesStayNames: names that look like the defaults, or that
// carry quotes and SQL, are rendered as names: the objects land where they
// were asked for and no statement runs that the files do not hold.
func TestHostileNamesStayNames(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	for _, n := range []struct{ schema, table string }{
		{"outbox", "events"},
		{"outbox_app", "public"},
		{`x'public.outbox'";--`, `t"; DROP TABLE x;--`},
	} {
		m, err := migrations.New(p, n.schema, n.table)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := m.Up(ctx); err != nil {
			t.Fatalf("%q.%q: %v", n.schema, n.table, err)
		}
		tbl := outbox.Table{Schema: n.schema, Name: n.table}
		var exists bool
		if err := p.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, tbl.Ident()).Scan(&exists); err != nil || !exists {
			t.Fatalf("%s was not created (%v)", tbl.Ident(), err)
		}
		if _, err := outbox.NewStore(p, tbl).Incarnation(ctx); err != nil {
			t.Fatalf("%s: %v", tbl.Ident(), err)
		}
	}
}

// TestNamesTooLongAreRefused: a table name that would overflow PostgreSQL's
// 63-byte identifiers is refused with the variable to fix.
func TestNamesTooLongAreRefused(t *testing.T) {
	_, err := migrations.New(nil, "public", strings.Repeat("x", 60))
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_TABLE") {
		t.Fatalf("err = %v, want one naming OUTBOX_TABLE", err)
	}
}

// TestPlainSQLFileAppliesWithPsql applies the SQL files as a team's own
// migration tool would (psql, no renaming) and checks the relay's migrator
// then sees an outbox it can use.
func TestPlainSQLFileAppliesWithPsql(t *testing.T) {
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatalf("psql not found: install postgresql-client")
	}
	url := testenv.CreateDatabase(t)
	files, _ := filepath.Glob("sql/*.up.sql")
	for _, f := range files {
		out, err := exec.Command("psql", url, "-v", "ON_ERROR_STOP=1", "-q", "-f", f).CombinedOutput()
		if err != nil {
			t.Fatalf("psql -f %s: %v\n%s", f, err, out)
		}
	}
	p, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	ctx := context.Background()
	if err := outbox.DefaultTable.Write(ctx, p, outbox.Message{Topic: "t", Key: []byte("k")}); err != nil {
		t.Fatal(err)
	}
	if _, err := outbox.NewStore(p, outbox.DefaultTable).Incarnation(ctx); err != nil {
		t.Fatal(err)
	}
	// Applied by another tool: no version table, yet nothing is pending, so
	// the relay starts.
	m, _ := migrations.New(p, "public", "outbox")
	if pending, err := m.Pending(ctx); err != nil || pending != 0 {
		t.Fatalf("pending after applying every file with psql: %d, %v", pending, err)
	}
	// The rendered SQL for the default names is the file itself.
	all, _ := m.All()
	raw, _ := os.ReadFile("sql/0001_create_outbox.up.sql")
	if all[0].SQL != string(raw) {
		t.Fatal("rendering for the default names changed the SQL file")
	}
}

// TestAppliedElsewhereWithoutTheNewestVersionIsPending: a schema applied by
// another tool up to the version before the newest (no version table) is
// not current: the relay must refuse to start until the newest is applied
// (appliedElsewhere looks for the newest migration's objects).
func TestAppliedElsewhereWithoutTheNewestVersionIsPending(t *testing.T) {
	ctx := context.Background()
	p := pool(t)
	m, _ := migrations.New(p, "public", "outbox")
	all, err := m.All()
	if err != nil {
		t.Fatal(err)
	}
	for _, mig := range all[:len(all)-1] {
		if _, err := p.Exec(ctx, mig.SQL); err != nil {
			t.Fatalf("apply version %d by hand: %v", mig.Version, err)
		}
	}
	pending, err := m.Pending(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if pending == 0 {
		t.Fatalf("every version but %d (%s) applied by another tool: Pending says 0, want the schema reported behind", all[len(all)-1].Version, all[len(all)-1].Name)
	}
	if _, err := p.Exec(ctx, all[len(all)-1].SQL); err != nil {
		t.Fatal(err)
	}
	if pending, err := m.Pending(ctx); err != nil || pending != 0 {
		t.Fatalf("every version applied by another tool: Pending = %d, %v; want 0", pending, err)
	}
}
