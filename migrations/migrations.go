// Package migrations holds outbox-relay's versioned SQL and the one migrator
// that applies it and the inbox's.
//
// The SQL files under sql/ are plain SQL for the default names (schema
// "public", table "outbox"), so teams that run golang-migrate, goose or Flyway
// can apply them with their own tool. [Migrator] renders a [Set] of such
// files (an embedded file system, a default table name and an advisory lock
// key) for the configured schema and table, applies the ones not yet applied
// in one transaction under the set's advisory lock (two processes migrating
// at once take turns), and records each version in the table
// <table>_schema_migrations. [New] opens the relay's set ([Outbox]); package
// inbox opens its own.
package migrations

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"strings"

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

// Outbox is the set of the relay's own migrations: the files under sql/,
// written for "public"."outbox", under the lock key LockKey+1.
func Outbox() Set {
	sub, err := fs.Sub(files, "sql")
	if err != nil {
		panic(err) // "sql" is a valid path: fs.Sub cannot fail on it
	}
	return Set{
		Files:        sub,
		LockKey:      migrateLockKey,
		DefaultTable: "outbox",
		CheckNames:   CheckNames,
		Current: func(ctx context.Context, m *Migrator) (bool, error) {
			return m.appliedElsewhere(ctx)
		},
	}
}

// New returns a migrator of the relay's migrations ([Outbox]) for
// schema.table. Names are used as given (they are quoted as identifiers, so
// "Outbox" and "outbox" differ).
func New(db DB, schema, table string) (*Migrator, error) {
	return Open(db, Outbox(), schema, table)
}

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
