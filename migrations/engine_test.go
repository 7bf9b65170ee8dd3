package migrations_test

import (
	"context"
	"errors"
	"os"
	"strings"
	"testing"
	"testing/fstest"
	"time"

	"github.com/outbox-relay/outbox-relay/migrations"
)

// widgets is a set of two migrations written for "public"."widget".
func widgets() (fstest.MapFS, migrations.Set) {
	files := fstest.MapFS{
		"0001_create.up.sql": {Data: []byte(`CREATE TABLE "public"."widget" (id bigint PRIMARY KEY);
CREATE TABLE "public"."widget_log" (id bigint, note text);
COMMENT ON TABLE "public"."widget" IS 'public.widget';`)},
		"0002_more.up.sql": {Data: []byte(`ALTER TABLE "public"."widget" ADD COLUMN name text;`)},
	}
	return files, migrations.Set{Label: "widget", Files: files, LockKey: 42, DefaultTable: "widget"}
}

// TestOneEngineOverAnyFileSystem: the migrator applies a set it is given
// (its own files, default table and lock key) under the names it was opened
// with, and a file dropped in later is the one pending migration.
func TestOneEngineOverAnyFileSystem(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	files, set := widgets()
	m, err := migrations.Open(p, set, "shop", "gadget")
	if err != nil {
		t.Fatal(err)
	}
	ran, err := m.Up(ctx)
	if err != nil || len(ran) != 2 || ran[0].Version != 1 || ran[1].Name != "more" {
		t.Fatalf("Up: %+v, %v; want versions 1 and 2", ran, err)
	}
	var comment string
	if err := p.QueryRow(ctx, `SELECT obj_description('shop.gadget'::regclass) || ' ' || (to_regclass('shop.gadget_log') IS NOT NULL)::text || ' ' || (to_regclass('public.widget') IS NULL)::text`).Scan(&comment); err != nil {
		t.Fatal(err)
	}
	if comment != "shop.gadget true true" {
		t.Fatalf("rendered objects: %q, want the comment literal renamed, gadget_log created and public.widget absent", comment)
	}
	files["0003_drop_in.up.sql"] = &fstest.MapFile{Data: []byte(`ALTER TABLE "public"."widget_log" ADD COLUMN at timestamptz;`)}
	if n, err := m.Pending(ctx); err != nil || n != 1 {
		t.Fatalf("Pending after a file dropped in: %d, %v; want 1", n, err)
	}
	if ran, err := m.Up(ctx); err != nil || len(ran) != 1 || ran[0].Version != 3 {
		t.Fatalf("Up after a file dropped in: %+v, %v", ran, err)
	}
	st, err := m.Status(ctx)
	if err != nil || len(st) != 3 || st[2].AppliedAt.IsZero() {
		t.Fatalf("Status: %+v, %v", st, err)
	}
	sql, err := m.SQL()
	if err != nil || !strings.HasPrefix(sql, "-- widget version 1: create\n") {
		t.Fatalf("SQL:\n%s\n%v", sql, err)
	}
}

// TestSetFilesAreChecked: a file not named NNNN_name.up.sql and two files
// of one version are refused with the file to fix.
func TestSetFilesAreChecked(t *testing.T) {
	files, set := widgets()
	files["create.sql"] = &fstest.MapFile{}
	m, err := migrations.Open(nil, set, "public", "widget")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.All(); err == nil || !strings.Contains(err.Error(), "create.sql") {
		t.Fatalf("All with a badly named file: %v", err)
	}
	delete(files, "create.sql")
	files["0002_again.up.sql"] = &fstest.MapFile{}
	if _, err := m.All(); err == nil || !strings.Contains(err.Error(), "version 2 is used twice") {
		t.Fatalf("All with version 2 twice: %v", err)
	}
	if _, err := migrations.Open(nil, set, "", "widget"); err == nil {
		t.Fatal("Open accepted an empty schema")
	}
}

// TestSetsTakeTheirOwnLock: while one set's migration lock on shop.gadget
// is held, another set migrates the same names at once, and the first set's
// Up waits for the holder.
func TestSetsTakeTheirOwnLock(t *testing.T) {
	p := pool(t)
	ctx := context.Background()
	_, set := widgets()
	tx, err := p.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback(ctx) //nolint:errcheck // test cleanup
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock(42, hashtext('shop.gadget'))`); err != nil {
		t.Fatal(err)
	}
	other := set
	other.LockKey = 43
	other.Files = fstest.MapFS{"0001_other.up.sql": {Data: []byte(`CREATE TABLE "public"."widget_other" (id int);`)}}
	mo, _ := migrations.Open(p, other, "shop", "gadget")
	short, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if _, err := mo.Up(short); err != nil {
		t.Fatalf("a set with its own lock key waited for another's lock: %v", err)
	}
	m, _ := migrations.Open(p, set, "shop", "gadget2")
	if _, err := m.Up(short); err != nil {
		t.Fatalf("the lock of shop.gadget held up shop.gadget2: %v", err)
	}
	m, _ = migrations.Open(p, set, "shop", "gadget")
	blocked, cancel2 := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel2()
	if _, err := m.Up(blocked); !errors.Is(err, context.DeadlineExceeded) && (err == nil || !strings.Contains(err.Error(), "lock")) {
		t.Fatalf("Up while its own lock is held: %v, want it to wait", err)
	}
}

// TestOutboxSetHoldsEveryFile: every file under sql/ is a migration of the
// relay's set, so a new NNNN_name.up.sql needs no registration.
func TestOutboxSetHoldsEveryFile(t *testing.T) {
	entries, err := os.ReadDir("sql")
	if err != nil {
		t.Fatal(err)
	}
	m, err := migrations.New(nil, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	all, err := m.All()
	if err != nil {
		t.Fatal(err)
	}
	if len(all) != len(entries) {
		t.Fatalf("the outbox set has %d migrations, sql/ has %d files", len(all), len(entries))
	}
}
