package migrations

import (
	"context"
	"fmt"
	"io/fs"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Set is one family of versioned SQL files and how to apply it: the relay's
// outbox ([Outbox]) and the inbox's (package inbox) are two sets run by the
// same [Migrator].
//
// The files are plain SQL written for schema "public" and table
// DefaultTable: the migrator rewrites the "public" identifier, the
// 'public.<DefaultTable>' literal and every "<DefaultTable>..." identifier
// to the names it was opened with.
type Set struct {
	// Label names the set in errors and in SQL's headers ("inbox"); empty
	// for the relay's own migrations.
	Label string
	// Files holds the migrations at its root, named NNNN_name.up.sql.
	Files fs.FS
	// LockKey is the first half of the transaction-scoped advisory lock Up
	// takes; the second half is hashtext('<schema>.<table>'). Each set has
	// its own, so two sets migrating in one database never wait for each
	// other.
	LockKey int32
	// DefaultTable is the table name the files are written for.
	DefaultTable string
	// CheckNames refuses schema and table names the set cannot use, with
	// the setting to fix. Nil accepts any non-empty names that fit.
	CheckNames func(schema, table string) error
	// Current reports whether the newest migration's objects exist for
	// m's schema and table (m.DB, m.Schema, m.Table): a schema applied
	// with another tool (from SQL) has no version table, and Pending
	// counts it as current when Current says so. Nil means such a schema
	// is never current.
	Current func(ctx context.Context, m *Migrator) (bool, error)
}

// Migration is one versioned SQL file.
type Migration struct {
	Version int    // from the file name's leading number
	Name    string // the file name without the version and suffix
	SQL     string // rendered for the migrator's schema and table
}

// Applied describes a migration recorded in the schema-version table.
type Applied struct {
	Version   int
	Name      string
	AppliedAt time.Time // zero while pending
}

// Migrator applies one [Set] of migrations for one schema and table, in one
// transaction under the set's advisory lock (two processes migrating at
// once take turns), and records each version in <table>_schema_migrations.
type Migrator struct {
	db     DB
	set    Set
	schema string
	table  string
	names  *regexp.Regexp
}

// Open returns a migrator of set for schema.table. Names are used as given
// (they are quoted as identifiers, so "Outbox" and "outbox" differ).
func Open(db DB, set Set, schema, table string) (*Migrator, error) {
	check := set.CheckNames
	if check == nil {
		check = checkAny
	}
	if err := check(schema, table); err != nil {
		return nil, err
	}
	if set.Files == nil || set.DefaultTable == "" {
		return nil, fmt.Errorf("migration set %q: Files and DefaultTable are required", set.Label)
	}
	t := regexp.QuoteMeta(set.DefaultTable)
	return &Migrator{
		db: db, set: set, schema: schema, table: table,
		names: regexp.MustCompile(`"public"|'public\.` + t + `'|"` + t + `([a-z_]*)"`),
	}, nil
}

// DB is the database handle the migrator was opened on.
func (m *Migrator) DB() DB { return m.db }

// Schema is the schema the migrator was opened for.
func (m *Migrator) Schema() string { return m.schema }

// Table is the table name the migrator was opened for.
func (m *Migrator) Table() string { return m.table }

// checkAny is the default Set.CheckNames.
func checkAny(schema, table string) error {
	switch {
	case schema == "":
		return fmt.Errorf("schema name is empty")
	case table == "":
		return fmt.Errorf("table name is empty")
	case len(schema) > 63:
		return fmt.Errorf("schema name %q is %d bytes: PostgreSQL allows 63", schema, len(schema))
	case len(table) > 63-len(longestSuffix):
		return fmt.Errorf("table name %q is %d bytes: at most %d fit with the suffix %q", table, len(table), 63-len(longestSuffix), longestSuffix)
	case strings.ContainsRune(schema+table, 0):
		return fmt.Errorf("schema or table name contains a NUL byte")
	}
	return nil
}

// longestSuffix is the longest suffix the migrator adds to the table name.
const longestSuffix = "_schema_migrations"

var fileName = regexp.MustCompile(`^(\d+)_([a-z0-9_]+)\.up\.sql$`)

// QuoteIdent quotes s as a PostgreSQL identifier.
func QuoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// quoteLiteral quotes s as a PostgreSQL string literal.
func quoteLiteral(s string) string {
	return `'` + strings.ReplaceAll(s, `'`, `''`) + `'`
}

// what prefixes s with the set's label: "migration" or "inbox migration".
func (m *Migrator) what(s string) string {
	if m.set.Label == "" {
		return s
	}
	return m.set.Label + " " + s
}

// render rewrites SQL written for "public"."<DefaultTable>" to the
// migrator's names in one pass, so that a replacement is never rewritten
// again (a schema named like the default table stays a schema) and every
// name is quoted for its context.
func (m *Migrator) render(sql string) string {
	return m.names.ReplaceAllStringFunc(sql, func(s string) string {
		switch {
		case s == `"public"`:
			return QuoteIdent(m.schema)
		case strings.HasPrefix(s, `'`):
			return quoteLiteral(m.schema + "." + m.table)
		default:
			return QuoteIdent(m.table + m.names.FindStringSubmatch(s)[1])
		}
	})
}

// All returns every migration, in version order, rendered for the migrator's
// schema and table.
func (m *Migrator) All() ([]Migration, error) {
	names, err := fs.Glob(m.set.Files, "*.sql")
	if err != nil {
		return nil, fmt.Errorf("list %s: %w", m.what("migrations"), err)
	}
	var out []Migration
	for _, base := range names {
		match := fileName.FindStringSubmatch(base)
		if match == nil {
			return nil, fmt.Errorf("%s file %s: name must look like 0001_name.up.sql", m.what("migration"), base)
		}
		version, _ := strconv.Atoi(match[1])
		body, err := fs.ReadFile(m.set.Files, base)
		if err != nil {
			return nil, fmt.Errorf("read %s %s: %w", m.what("migration"), base, err)
		}
		out = append(out, Migration{Version: version, Name: match[2], SQL: m.render(string(body))})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
	for i := 1; i < len(out); i++ {
		if out[i].Version == out[i-1].Version {
			return nil, fmt.Errorf("%s version %d is used twice (%s and %s): renumber one file",
				m.what("migration"), out[i].Version, out[i-1].Name, out[i].Name)
		}
	}
	return out, nil
}

// SQL returns the DDL of every migration, rendered for the migrator's names,
// for review or for another migration tool.
func (m *Migrator) SQL() (string, error) {
	all, err := m.All()
	if err != nil {
		return "", err
	}
	var b strings.Builder
	for _, mig := range all {
		fmt.Fprintf(&b, "-- %s %d: %s\n%s\n", m.what("version"), mig.Version, mig.Name, mig.SQL)
	}
	return b.String(), nil
}

func (m *Migrator) versionTable() string {
	return QuoteIdent(m.schema) + "." + QuoteIdent(m.table+longestSuffix)
}

// lock takes the set's transaction-scoped advisory lock, so that two
// processes migrating the same table at once apply each version once.
func (m *Migrator) lock(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, m.set.LockKey, m.schema+"."+m.table)
	if err != nil {
		return fmt.Errorf("take %s lock: %w", m.what("migration"), err)
	}
	return nil
}

func (m *Migrator) ensureVersionTable(ctx context.Context, tx pgx.Tx) error {
	stmt := `CREATE SCHEMA IF NOT EXISTS ` + QuoteIdent(m.schema) + `;
CREATE TABLE IF NOT EXISTS ` + m.versionTable() + ` (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)`
	if _, err := tx.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("create schema-version table %s: %w", m.versionTable(), err)
	}
	return nil
}

func (m *Migrator) applied(ctx context.Context, tx pgx.Tx) (map[int]Applied, error) {
	rows, err := tx.Query(ctx, `SELECT version, name, applied_at FROM `+m.versionTable()+` ORDER BY version`)
	if err != nil {
		return nil, fmt.Errorf("read schema-version table %s: %w", m.versionTable(), err)
	}
	list, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Applied, error) {
		var a Applied
		err := r.Scan(&a.Version, &a.Name, &a.AppliedAt)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("read schema-version table %s: %w", m.versionTable(), err)
	}
	out := make(map[int]Applied, len(list))
	for _, a := range list {
		out[a.Version] = a
	}
	return out, nil
}

// Up applies every migration not yet applied, in one transaction, and returns
// the versions it applied (none when the schema is current). Safe to run from
// several processes at once: they serialize on the set's advisory lock and
// the later ones find nothing left to do.
func (m *Migrator) Up(ctx context.Context) ([]Migration, error) {
	all, err := m.All()
	if err != nil {
		return nil, err
	}
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s: begin: %w", m.what("migrate"), err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // no-op after commit
	if err := m.lock(ctx, tx); err != nil {
		return nil, err
	}
	if err := m.ensureVersionTable(ctx, tx); err != nil {
		return nil, err
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
			return nil, fmt.Errorf("apply %s %d (%s): %w", m.what("migration"), mig.Version, mig.Name, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+m.versionTable()+` (version, name) VALUES ($1, $2)`, mig.Version, mig.Name); err != nil {
			return nil, fmt.Errorf("record %s %d: %w", m.what("migration"), mig.Version, err)
		}
		ran = append(ran, mig)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("%s: commit: %w", m.what("migrate"), err)
	}
	return ran, nil
}

// Status lists every known migration and, for the applied ones, when they
// were applied. Pending migrations have a zero AppliedAt.
func (m *Migrator) Status(ctx context.Context) ([]Applied, error) {
	all, err := m.All()
	if err != nil {
		return nil, err
	}
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("%s status: begin: %w", m.what("migration"), err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, m.versionTable()).Scan(&exists); err != nil {
		return nil, fmt.Errorf("%s status: %w", m.what("migration"), err)
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

// Pending reports how many migrations Up would apply. The relay and the
// inbox refuse to start while any is pending.
//
// A schema applied with another tool (golang-migrate, goose, Flyway, psql
// on the output of SQL) has no <table>_schema_migrations table; it counts
// as current when the set's Current finds the newest migration's objects.
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
	if n == len(st) && n > 0 && m.set.Current != nil {
		current, err := m.set.Current(ctx, m)
		if err != nil {
			return 0, err
		}
		if current {
			return 0, nil
		}
	}
	return n, nil
}
