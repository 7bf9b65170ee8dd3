package inbox

import (
	"context"
	"embed"
	"errors"
	"fmt"
	"io/fs"
	"strings"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/migrations"
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
type Migration = migrations.Migration

// Applied is a migration recorded in the inbox's schema-version table.
type Applied = migrations.Applied

// Migrator applies the inbox's migrations (its tables <table>_offsets,
// <table>_applied and <table>_dead_letter) in one schema. It is the engine
// of package migrations over the inbox's own set: its own SQL, its own
// version table <table>_schema_migrations and its own advisory lock, so a
// service that only consumes never needs the outbox's schema.
type Migrator = migrations.Migrator

// Migrations is the inbox's set of migrations: the files under sql/,
// written for "public"."inbox...", under the inbox's own lock key.
func Migrations() migrations.Set {
	sub, err := fs.Sub(files, "sql")
	if err != nil {
		panic(err) // "sql" is a valid path: fs.Sub cannot fail on it
	}
	return migrations.Set{
		Label:        "inbox",
		Files:        sub,
		LockKey:      migrateLockKey,
		DefaultTable: "inbox",
		CheckNames:   checkNames,
		Current:      current,
	}
}

// NewMigrator returns a migrator for the inbox tables named table+suffix in
// schema (the defaults are "public" and "inbox"). Names are quoted as
// identifiers.
func NewMigrator(db DB, schema, table string) (*Migrator, error) {
	return migrations.Open(db, Migrations(), schema, table)
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

// current reports whether the newest inbox migration's objects exist:
// version 1's tables and version 2's event_id columns. Update it with each
// new migration.
func current(ctx context.Context, m *Migrator) (bool, error) {
	var ok bool
	q := func(suffix string) string {
		return migrations.QuoteIdent(m.Schema()) + "." + migrations.QuoteIdent(m.Table()+suffix)
	}
	err := pgx.BeginFunc(ctx, m.DB(), func(tx pgx.Tx) error {
		return tx.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL AND to_regclass($2) IS NOT NULL AND to_regclass($3) IS NOT NULL
    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($2) AND attname = 'event_id' AND NOT attisdropped)
    AND EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass($3) AND attname = 'event_id' AND NOT attisdropped)`,
			q("_offsets"), q("_applied"), q("_dead_letter")).Scan(&ok)
	})
	if err != nil {
		return false, fmt.Errorf("inbox: check the schema: %w", err)
	}
	return ok, nil
}

// quoteIdent quotes s as a PostgreSQL identifier.
func quoteIdent(s string) string { return migrations.QuoteIdent(s) }
