package replication

import (
	"context"
	"fmt"
	"regexp"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
)

// DB is what EnsurePublication needs: a pool, a connection or a transaction.
type DB interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

var notSlotChar = regexp.MustCompile(`[^a-z0-9_]+`)

// DefaultSlot is the slot name used when none is set: replication slots are
// named per cluster, so the name carries the database, schema and table,
// lower-cased, other characters as _, at most 63 bytes.
func DefaultSlot(database, schema, table string) string {
	n := notSlotChar.ReplaceAllString(strings.ToLower(database+"_"+schema+"_"+table), "_")
	n = strings.Trim(n, "_")
	if len(n) > 63-len("_relay") {
		n = n[:63-len("_relay")]
	}
	return n + "_relay"
}

// DefaultPublication is the publication name used when none is set:
// publications are named per database, so the name carries the schema and
// table.
func DefaultPublication(schema, table string) string {
	n := schema + "_" + table
	if len(n) > 63-len("_relay") {
		n = n[:63-len("_relay")]
	}
	return n + "_relay"
}

// EnsurePublication creates the publication of the table's inserts if it
// does not exist, and checks that an existing one publishes exactly the
// table's inserts: a publication of updates would send the poll path's
// marks, one of other tables their rows.
func EnsurePublication(ctx context.Context, db DB, name, schema, table string) error {
	qualified := pgx.Identifier{schema, table}.Sanitize()
	var exists bool
	if err := db.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = $1)`, name).Scan(&exists); err != nil {
		return fmt.Errorf("publication %q: %w", name, err)
	}
	if !exists {
		_, err := db.Exec(ctx, fmt.Sprintf(`CREATE PUBLICATION %s FOR TABLE %s WITH (publish = 'insert')`, pgx.Identifier{name}.Sanitize(), qualified))
		if err != nil {
			return fmt.Errorf("create publication %q for %s: %w (it needs the CREATE privilege on the database and ownership of the table: run `outbox-relay migrate up` with the admin role)", name, qualified, err)
		}
		return nil
	}
	var ins, upd, del, trunc, all bool
	var tables []string
	err := db.QueryRow(ctx, `SELECT p.pubinsert, p.pubupdate, p.pubdelete, p.pubtruncate, p.puballtables,
		coalesce((SELECT array_agg(t.schemaname || '.' || t.tablename ORDER BY 1) FROM pg_publication_tables t WHERE t.pubname = p.pubname), '{}')
		FROM pg_publication p WHERE p.pubname = $1`, name).Scan(&ins, &upd, &del, &trunc, &all, &tables)
	if err != nil {
		return fmt.Errorf("publication %q: %w", name, err)
	}
	want := schema + "." + table
	if !ins || upd || del || trunc || all || len(tables) != 1 || tables[0] != want {
		return fmt.Errorf("publication %q exists but is not the relay's: it must publish only inserts of %s (it publishes insert=%t update=%t delete=%t truncate=%t all_tables=%t, tables %v): set OUTBOX_REPLICATION_PUBLICATION to another name, or drop it",
			name, want, ins, upd, del, trunc, all, tables)
	}
	return nil
}
