package inbox

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

//go:embed sql/*.sql
var files embed.FS

// migrateLockKey is the first half of the inbox migrator's advisory lock
// key ("inbx" in ASCII); the second half is hashtext('<schema>.<table>').
// It differs from the relay's keys (package migrations), so migrating an
// outbox and an inbox in one database never wait for each other.
const migrateLockKey = 1768841848

// longestSuffix is the longest suffix the inbox adds to Config.Table.
const longestSuffix = "_schema_migrations"

// Migration is one versioned SQL file of the inbox.
type Migration struct {
	Version int    // from the file name's leading number
	Name    string // the file name without the version and suffix
	SQL     string // rendered for the migrator's schema and table prefix
}

// Applied is a migration recorded in the inbox's schema-version table.
type Applied struct {
	Version   int
	Name      string
	AppliedAt time.Time // zero while pending
}

// Migrator applies the inbox's migrations (its tables <table>_offsets,
// <table>_applied and <table>_dead_letter) in one schema. It is separate from
// the relay's migrations: its own SQL, its own version table
// <table>_schema_migrations and its own advisory lock, so a service that
// only consumes never needs the outbox's schema.
type Migrator struct {
	db     DB
	schema string
	table  string
}

// NewMigrator returns a migrator for the inbox tables named table+suffix in
// schema (the defaults are "public" and "inbox"). Names are quoted as
// identifiers.
func NewMigrator(db DB, schema, table string) (*Migrator, error) {
	if err := checkNames(schema, table); err != nil {
		return nil, err
	}
	return &Migrator{db: db, schema: schema, table: table}, nil
}

func checkNames(schema, table string) error {
	switch {
	case schema == "":
		return errors.New("inbox schema is empty: set Config.Schema, for example to public")
	case table == "":
		return errors.New("inbox table prefix is empty: set Config.Table, for example to inbox")
	case len(schema) > 63:
		return fmt.Errorf("inbox schema %q is %d bytes: PostgreSQL allows 63", schema, len(schema))
	case len(table) > 63-len(longestSuffix):
		return fmt.Errorf("inbox table prefix %q is %d bytes: at most %d fit with the suffix %q", table, len(table), 63-len(longestSuffix), longestSuffix)
	case strings.ContainsRune(schema+table, 0):
		return errors.New("inbox schema or table prefix contains a NUL byte")
	}
	return nil
}

var (
	fileName = regexp.MustCompile(`^(\d+)_([a-z0-9_]+)\.up\.sql$`)
	// defaultNames matches, in the SQL files, the schema identifier and
	// every identifier derived from the table prefix.
	defaultNames = regexp.MustCompile(`"public"|"inbox([a-z_]*)"`)
)

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// render rewrites SQL written for "public"."inbox_..." to the migrator's
// names in one pass, so a replacement is never rewritten again.
func (m *Migrator) render(sql string) string {
	return defaultNames.ReplaceAllStringFunc(sql, func(s string) string {
		if s == `"public"` {
			return quoteIdent(m.schema)
		}
		return quoteIdent(m.table + defaultNames.FindStringSubmatch(s)[1])
	})
}

// All returns every migration in version order, rendered.
func (m *Migrator) All() ([]Migration, error) {
	names, err := fs.Glob(files, "sql/*.sql")
	if err != nil {
		return nil, fmt.Errorf("list inbox migrations: %w", err)
	}
	var out []Migration
	for _, path := range names {
		base := strings.TrimPrefix(path, "sql/")
		match := fileName.FindStringSubmatch(base)
		if match == nil {
			return nil, fmt.Errorf("inbox migration file %s: name must look like 0001_name.up.sql", base)
		}
		version, _ := strconv.Atoi(match[1])
		body, err := files.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read inbox migration %s: %w", base, err)
		}
		out = append(out, Migration{Version: version, Name: match[2], SQL: m.render(string(body))})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	return out, nil
}

// SQL returns the DDL of every migration, rendered, for review or for
// another migration tool.
func (m *Migrator) SQL() (string, error) {
	all, err := m.All()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, mig := range all {
		fmt.Fprintf(&b, "-- inbox version %d: %s\n%s\n", mig.Version, mig.Name, mig.SQL)
	}
	return b.String(), nil
}

func (m *Migrator) versionTable() string {
	return quoteIdent(m.schema) + "." + quoteIdent(m.table+longestSuffix)
}

// Up applies every migration not yet applied, in one transaction under an
// advisory lock, and returns the ones it applied (none when current). Two
// processes migrating at once take turns; the later finds nothing to do.
func (m *Migrator) Up(ctx context.Context) ([]Migration, error) {
	all, err := m.All()
	if err != nil {
		return nil, err
	}
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("inbox migrate: begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, migrateLockKey, m.schema+"."+m.table); err != nil {
		return nil, fmt.Errorf("inbox migrate: take the migration lock: %w", err)
	}
	stmt := `CREATE SCHEMA IF NOT EXISTS ` + quoteIdent(m.schema) + `;
CREATE TABLE IF NOT EXISTS ` + m.versionTable() + ` (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`
	if _, err := tx.Exec(ctx, stmt); err != nil {
		return nil, fmt.Errorf("inbox migrate: create %s: %w", m.versionTable(), err)
	}
	done, err := m.applied(ctx, tx)
	if err != nil {
		return nil, err
	}
	var ran []Migration
	for _, mig := range all {
		if _, ok := done[mig.Version]; ok {
			continue
		}
		if _, err := tx.Exec(ctx, mig.SQL); err != nil {
			return nil, fmt.Errorf("apply inbox migration %d (%s): %w", mig.Version, mig.Name, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+m.versionTable()+` (version, name) VALUES ($1, $2)`, mig.Version, mig.Name); err != nil {
			return nil, fmt.Errorf("record inbox migration %d: %w", mig.Version, err)
		}
		ran = append(ran, mig)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("inbox migrate: commit: %w", err)
	}
	return ran, nil
}

func (m *Migrator) applied(ctx context.Context, tx pgx.Tx) (map[int]Applied, error) {
	rows, err := tx.Query(ctx, `SELECT version, name, applied_at FROM `+m.versionTable())
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", m.versionTable(), err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Applied, error) {
		var a Applied
		err := r.Scan(&a.Version, &a.Name, &a.AppliedAt)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("read %s: %w", m.versionTable(), err)
	}
	out := make(map[int]Applied, len(list))
	for _, a := range list {
		out[a.Version] = a
	}
	return out, nil
}

// Status lists every known migration; pending ones have a zero AppliedAt.
func (m *Migrator) Status(ctx context.Context) ([]Applied, error) {
	all, err := m.All()
	if err != nil {
		return nil, err
	}
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("inbox migration status: begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, m.versionTable()).Scan(&exists); err != nil {
		return nil, fmt.Errorf("inbox migration status: %w", err)
	}
	done := map[int]Applied{}
	if exists {
		if done, err = m.applied(ctx, tx); err != nil {
			return nil, err
		}
	}
	out := make([]Applied, 0, len(all))
	for _, mig := range all {
		a, ok := done[mig.Version]
		if !ok {
			a = Applied{Version: mig.Version, Name: mig.Name}
		}
		out = append(out, a)
	}
	return out, nil
}

// Pending reports how many migrations Up would apply; Run refuses to start
// while any is pending.
//
// Tables created with another migration tool (from Migrator.SQL) leave no
// <table>_schema_migrations; they count as current when the newest
// migration's objects exist.
func (m *Migrator) Pending(ctx context.Context) (int, error) {
	st, err := m.Status(ctx)
	if err != nil {
		return 0, err
	}
	n := 0
	for _, a := range st {
		if a.AppliedAt.IsZero() {
			n++
		}
	}
	if n == len(st) && n > 0 {
		// Version 1's tables and version 2's event_id columns, the newest
		// objects. Update with each new migration.
		var ok bool
		q := func(suffix string) string { return quoteIdent(m.schema) + "." + quoteIdent(m.table+suffix) }
		err := pgx.BeginFunc(ctx, m.db, func(tx pgx.Tx) error {
			return tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL
    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($2) AND attname = 'event_id' AND NOT attisdropped)
    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($3) AND attname = 'event_id' AND NOT attisdropped)`,
				q("_offsets"), q("_applied"), q("_dead_letter")).Scan(&ok)
		})
		if err != nil {
			return 0, fmt.Errorf("inbox: check the schema: %w", err)
		}
		if ok {
			return 0, nil
		}
	}
	return n, nil
}
