// Package migrations holds outbox-relay's versioned SQL and the migrator that
// applies it.
//
// The SQL files under sql/ are plain SQL for the default names (schema
// "public", table "outbox"), so teams that run golang-migrate, goose or Flyway
// can apply them with their own tool. [Migrator] renders them for the
// configured schema and table, applies the ones not yet applied in one
// transaction under an advisory lock (two processes migrating at once take
// turns), and records each version in the table <table>_schema_migrations.
package migrations

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

// LockKey is the first half of every advisory lock key outbox-relay takes
// ("outb" in ASCII). The second half is hashtext('<schema>.<table>').
const LockKey = 1869968482

// migrateLockKey is the first half of the migrator's advisory lock key.
const migrateLockKey = LockKey + 1

// DB is what the migrator needs of a database handle: *pgx.Conn and
// *pgxpool.Pool both fit.
type DB interface {
	Begin(ctx context.Context) (pgx.Tx, error)
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
	AppliedAt time.Time
}

// Migrator applies outbox-relay's migrations for one schema and table.
type Migrator struct {
	db     DB
	schema string
	table  string
}

// New returns a migrator for schema.table. Names are used as given (they are
// quoted as identifiers, so "Outbox" and "outbox" differ).
func New(db DB, schema, table string) (*Migrator, error) {
	if err := CheckNames(schema, table); err != nil {
		return nil, err
	}
	return &Migrator{db: db, schema: schema, table: table}, nil
}

// longestSuffix is the longest suffix migrations add to the table name.
const longestSuffix = "_schema_migrations"

// CheckNames reports whether schema and table can name outbox-relay's
// objects: both non-empty, and short enough that every derived name fits in
// PostgreSQL's 63-byte identifiers.
func CheckNames(schema, table string) error {
	if schema == "" {
		return errors.New("schema name is empty: set OUTBOX_SCHEMA, for example to public")
	}
	if table == "" {
		return errors.New("table name is empty: set OUTBOX_TABLE, for example to outbox")
	}
	if len(schema) > 63 {
		return fmt.Errorf("schema name %q is %d bytes: PostgreSQL allows 63, shorten OUTBOX_SCHEMA", schema, len(schema))
	}
	if max := 63 - len(longestSuffix); len(table) > max {
		return fmt.Errorf("table name %q is %d bytes: at most %d fit with the suffix %q, shorten OUTBOX_TABLE", table, len(table), max, longestSuffix)
	}
	if strings.ContainsRune(schema+table, 0) {
		return errors.New("schema or table name contains a NUL byte: fix OUTBOX_SCHEMA or OUTBOX_TABLE")
	}
	return nil
}

var (
	fileName = regexp.MustCompile(`^(\d+)_([a-z0-9_]+)\.up\.sql$`)
	// defaultNames matches, in the SQL files, the schema identifier, the
	// 'public.outbox' literal and every identifier derived from the table.
	defaultNames = regexp.MustCompile(`"public"|'public\.outbox'|"outbox([a-z_]*)"`)
)

// QuoteIdent quotes s as a PostgreSQL identifier.
func QuoteIdent(s string) string {
	return `"` + strings.ReplaceAll(s, `"`, `""`) + `"`
}

// quoteLiteral quotes s as a PostgreSQL string literal.
func quoteLiteral(s string) string {
	return `'` + strings.ReplaceAll(s, `'`, `''`) + `'`
}

// render rewrites SQL written for "public"."outbox" to the migrator's names
// in one pass, so that a replacement is never rewritten again (a schema
// named "outbox" stays a schema) and every name is quoted for its context.
func (m *Migrator) render(sql string) string {
	return defaultNames.ReplaceAllStringFunc(sql, func(s string) string {
		switch {
		case s == `"public"`:
			return QuoteIdent(m.schema)
		case s == `'public.outbox'`:
			return quoteLiteral(m.schema + "." + m.table)
		default:
			return QuoteIdent(m.table + defaultNames.FindStringSubmatch(s)[1])
		}
	})
}

// All returns every migration, in version order, rendered for the migrator's
// schema and table.
func (m *Migrator) All() ([]Migration, error) {
	names, err := fs.Glob(files, "sql/*.sql")
	if err != nil {
		return nil, fmt.Errorf("list migrations: %w", err)
	}
	var out []Migration
	for _, path := range names {
		base := strings.TrimPrefix(path, "sql/")
		match := fileName.FindStringSubmatch(base)
		if match == nil {
			return nil, fmt.Errorf("migration file %s: name must look like 0001_name.up.sql", base)
		}
		version, _ := strconv.Atoi(match[1])
		body, err := files.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("read migration %s: %w", base, err)
		}
		out = append(out, Migration{Version: version, Name: match[2], SQL: m.render(string(body))})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Version < out[j].Version })
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
		fmt.Fprintf(&b, "-- version %d: %s\n%s\n", mig.Version, mig.Name, mig.SQL)
	}
	return b.String(), nil
}

func (m *Migrator) versionTable() string {
	return QuoteIdent(m.schema) + "." + QuoteIdent(m.table+longestSuffix)
}

// lock takes the migrator's transaction-scoped advisory lock, so that two
// processes migrating the same table at once apply each version once.
func (m *Migrator) lock(ctx context.Context, tx pgx.Tx) error {
	_, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, migrateLockKey, m.schema+"."+m.table)
	if err != nil {
		return fmt.Errorf("take migration lock: %w", err)
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

func (m *Migrator) applied(ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}) ([]Applied, error) {
	rows, err := q.Query(ctx, `SELECT version, name, applied_at FROM `+m.versionTable()+` ORDER BY version`)
	if err != nil {
		return nil, fmt.Errorf("read schema-version table %s: %w", m.versionTable(), err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (Applied, error) {
		var a Applied
		err := r.Scan(&a.Version, &a.Name, &a.AppliedAt)
		return a, err
	})
	if err != nil {
		return nil, fmt.Errorf("read schema-version table %s: %w", m.versionTable(), err)
	}
	return out, nil
}

// Up applies every migration not yet applied, in one transaction, and returns
// the versions it applied (none when the schema is current). Safe to run from
// several processes at once: they serialize on an advisory lock and the later
// ones find nothing left to do.
func (m *Migrator) Up(ctx context.Context) ([]Migration, error) {
	all, err := m.All()
	if err != nil {
		return nil, err
	}
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return nil, fmt.Errorf("migrate: begin: %w", err)
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
	have := map[int]bool{}
	for _, a := range done {
		have[a.Version] = true
	}
	var ran []Migration
	for _, mig := range all {
		if have[mig.Version] {
			continue
		}
		if _, err := tx.Exec(ctx, mig.SQL); err != nil {
			return nil, fmt.Errorf("apply migration %d (%s): %w", mig.Version, mig.Name, err)
		}
		if _, err := tx.Exec(ctx, `INSERT INTO `+m.versionTable()+` (version, name) VALUES ($1, $2)`, mig.Version, mig.Name); err != nil {
			return nil, fmt.Errorf("record migration %d: %w", mig.Version, err)
		}
		ran = append(ran, mig)
	}
	if err := tx.Commit(ctx); err != nil {
		return nil, fmt.Errorf("migrate: commit: %w", err)
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
		return nil, fmt.Errorf("migration status: begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	var exists bool
	if err := tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL`, m.versionTable()).Scan(&exists); err != nil {
		return nil, fmt.Errorf("migration status: %w", err)
	}
	byVersion := map[int]Applied{}
	if exists {
		done, err := m.applied(ctx, tx)
		if err != nil {
			return nil, err
		}
		for _, a := range done {
			byVersion[a.Version] = a
		}
	}
	out := make([]Applied, 0, len(all))
	for _, mig := range all {
		a, ok := byVersion[mig.Version]
		if !ok {
			a = Applied{Version: mig.Version, Name: mig.Name}
		}
		out = append(out, a)
	}
	return out, nil
}

// Pending reports how many migrations Up would apply. The relay refuses to
// start while any is pending.
//
// A schema applied with another tool (golang-migrate, goose, Flyway) has no
// <table>_schema_migrations table; it counts as current when the newest
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
		if current, err := m.appliedElsewhere(ctx); err != nil {
			return 0, err
		} else if current {
			return 0, nil
		}
	}
	return n, nil
}

// appliedElsewhere reports whether the newest migration's objects exist:
// version 6's <table>_dead_letter_held_digest index (with it, every
// earlier object: version 5's discarded_at column of <table>_dead_letter
// is in its predicate) and version 7's event_id column of
// <table>_dead_letter, and version 8's stopped_at column of <table>_owner.
// Update it with each new migration.
func (m *Migrator) appliedElsewhere(ctx context.Context) (bool, error) {
	tx, err := m.db.Begin(ctx)
	if err != nil {
		return false, fmt.Errorf("check schema: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	dead := QuoteIdent(m.schema) + "." + QuoteIdent(m.table+"_dead_letter")
	held := QuoteIdent(m.schema) + "." + QuoteIdent(m.table+"_dead_letter_held_digest")
	owner := QuoteIdent(m.schema) + "." + QuoteIdent(m.table+"_owner")
	var ok bool
	err = tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND EXISTS (
    SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($2) AND attname = 'discarded_at' AND NOT attisdropped) AND EXISTS (
    SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($2) AND attname = 'event_id' AND NOT attisdropped) AND EXISTS (
    SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($3) AND attname = 'stopped_at' AND NOT attisdropped)`, held, dead, owner).Scan(&ok)
	if err != nil {
		return false, fmt.Errorf("check schema: %w", err)
	}
	return ok, nil
}
