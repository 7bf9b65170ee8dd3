package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// dbSettings are the few variables the admin commands need.
type dbSettings struct {
	url       string
	schema    string
	table     string
	orderName string
	order     outbox.DeadLetterOrder
	// shards is OUTBOX_SHARDS, 0 when unset: `migrate up` builds the
	// shard index for it when the table has no recorded count yet.
	shards    int
	onPublish outbox.OnPublish
}

func readDBSettings(environ []string, needURL bool) (dbSettings, error) {
	s := dbSettings{schema: "public", table: "outbox"}
	for _, kv := range environ {
		k, v, _ := strings.Cut(kv, "=")
		switch k {
		case "OUTBOX_DATABASE_URL":
			s.url = v
		case "OUTBOX_SCHEMA":
			s.schema = v
		case "OUTBOX_TABLE":
			s.table = v
		case "OUTBOX_DEAD_LETTER_ORDER":
			s.orderName = v
		case "OUTBOX_SHARDS":
			n, err := strconv.Atoi(strings.TrimSpace(v))
			if err != nil || n < 1 || n > 1024 {
				return s, fmt.Errorf("OUTBOX_SHARDS is %q: expected 1 to 1024", v)
			}
			s.shards = n
		case "OUTBOX_ON_PUBLISH":
			s.onPublish = outbox.OnPublish(v)
		}
	}
	onPublish, err := outbox.ParseOnPublish(string(s.onPublish))
	if err != nil {
		return s, fmt.Errorf("OUTBOX_ON_PUBLISH: %w", err)
	}
	s.onPublish = onPublish
	order, err := outbox.ParseDeadLetterOrder(s.orderName)
	if err != nil {
		return s, fmt.Errorf("OUTBOX_DEAD_LETTER_ORDER: %w", err)
	}
	s.order = order
	if needURL && s.url == "" {
		return s, errors.New("OUTBOX_DATABASE_URL is not set: set it to the PostgreSQL URL, e.g. postgres://user@host:5432/db")
	}
	if err := migrations.CheckNames(s.schema, s.table); err != nil {
		return s, err
	}
	return s, nil
}

func (s dbSettings) outboxTable() outbox.Table { return outbox.Table{Schema: s.schema, Name: s.table} }

func (s dbSettings) open(ctx context.Context) (*pgxpool.Pool, error) {
	return openPool(ctx, s.url, 1, nil)
}

// openMigrator opens a pool and the migrator of the configured table; the
// caller closes the pool.
func (s dbSettings) openMigrator(ctx context.Context) (*pgxpool.Pool, *migrations.Migrator, error) {
	pool, err := s.open(ctx)
	if err != nil {
		return nil, nil, err
	}
	m, err := migrations.New(pool, s.schema, s.table)
	if err != nil {
		pool.Close()
		return nil, nil, err
	}
	return pool, m, nil
}

// runMigrate is `outbox-relay migrate up|status|sql`.
func runMigrate(ctx context.Context, args, environ []string, stdout io.Writer) error {
	if len(args) != 1 {
		return errors.New("usage: outbox-relay migrate up|status|sql")
	}
	s, err := readDBSettings(environ, args[0] != "sql")
	if err != nil {
		return err
	}
	if args[0] == "sql" {
		m, err := migrations.New(nil, s.schema, s.table)
		if err != nil {
			return err
		}
		sql, err := m.SQL()
		if err != nil {
			return err
		}
		if s.shards > 1 {
			sql += fmt.Sprintf("-- the shard index for OUTBOX_SHARDS=%d: not a versioned migration (`outbox-relay migrate up` builds it for the\n"+
				"-- table's shard count, `outbox-relay reshard` replaces it when the count changes); CONCURRENTLY runs outside a transaction\n%s;\n",
				s.shards, s.outboxTable().ShardIndexSQL(s.shards))
		}
		_, err = io.WriteString(stdout, sql)
		return err
	}
	pool, m, err := s.openMigrator(ctx)
	if err != nil {
		return err
	}
	defer pool.Close()
	switch args[0] {
	case "up":
		ran, err := m.Up(ctx)
		if err != nil {
			return err
		}
		if len(ran) == 0 {
			fmt.Fprintf(stdout, "%s is up to date\n", s.outboxTable())
		}
		for _, mig := range ran {
			fmt.Fprintf(stdout, "applied %04d_%s to %s\n", mig.Version, mig.Name, s.outboxTable())
		}
		return buildShardIndex(ctx, pool, s, stdout)
	case "status":
		st, err := m.Status(ctx)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "VERSION\tNAME\tAPPLIED")
		for _, a := range st {
			when := "pending"
			if !a.AppliedAt.IsZero() {
				when = a.AppliedAt.UTC().Format(time.RFC3339)
			}
			fmt.Fprintf(tw, "%04d\t%s\t%s\n", a.Version, a.Name, when)
		}
		return tw.Flush()
	default:
		return fmt.Errorf("unknown migrate command %q: use up, status or sql", args[0])
	}
}

// buildShardIndex is the end of `migrate up`: the index serving the shard
// filter (outbox.ShardIndexSQL) for the table's shard count, the recorded
// one, or OUTBOX_SHARDS while none is recorded. It builds without blocking
// writers, so it may run while relays run; it drops nothing (reshard
// replaces the index of an old count).
func buildShardIndex(ctx context.Context, pool *pgxpool.Pool, s dbSettings, stdout io.Writer) error {
	t := s.outboxTable()
	var recorded *int
	if err := pool.QueryRow(ctx, `SELECT shards FROM `+t.StateIdent()).Scan(&recorded); err != nil {
		return fmt.Errorf("read the shard count recorded for %s: %w", t, err)
	}
	n := s.shards
	if recorded != nil {
		if s.shards != 0 && s.shards != *recorded {
			fmt.Fprintf(stdout, "OUTBOX_SHARDS is %d but %s is split into %d shards: the shard index is for %d (`outbox-relay reshard` changes the count, and its index)\n",
				s.shards, t, *recorded, *recorded)
		}
		n = *recorded
	}
	if n <= 1 {
		return nil
	}
	start := time.Now()
	built, err := outbox.CreateShardIndex(ctx, pool, t, n)
	if err != nil {
		return err
	}
	if built {
		fmt.Fprintf(stdout, "built the shard index %s for %d shards in %s\n", t.ShardIndexName(n), n, time.Since(start).Round(time.Millisecond))
	} else {
		fmt.Fprintf(stdout, "the shard index %s for %d shards is in place\n", t.ShardIndexName(n), n)
	}
	return nil
}

// runStatus is `outbox-relay status`.
func runStatus(ctx context.Context, environ []string, stdout io.Writer) error {
	s, err := readDBSettings(environ, true)
	if err != nil {
		return err
	}
	pool, m, err := s.openMigrator(ctx)
	if err != nil {
		return err
	}
	defer pool.Close()
	pending, err := m.Pending(ctx)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "table:               %s\n", s.outboxTable())
	fmt.Fprintf(stdout, "pending migrations:  %d\n", pending)
	if pending > 0 {
		fmt.Fprintln(stdout, "run `outbox-relay migrate up` first")
		return nil
	}
	st := outbox.NewStore(pool, s.outboxTable())
	b, err := st.Backlog(ctx, 0, 1)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "unpublished rows:    %d\n", b.Rows)
	if !b.OldestCreate.IsZero() {
		fmt.Fprintf(stdout, "oldest unpublished:  %s ago\n", time.Since(b.OldestCreate).Round(time.Millisecond))
	}
	if s.onPublish == outbox.Delete {
		// What the table can no longer show: how many rows were published.
		fmt.Fprintln(stdout, "on publish:          delete (OUTBOX_ON_PUBLISH): published rows are deleted, so the table shows the backlog and dead letters only; what was published is in Kafka: `outbox-relay verify -topics ...`")
		var marked int64
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+s.outboxTable().Ident()+` WHERE published_at IS NOT NULL`).Scan(&marked); err != nil {
			return fmt.Errorf("count rows marked published: %w", err)
		}
		if marked > 0 {
			fmt.Fprintf(stdout, "marked published:    %d (left by a relay in mark mode; OUTBOX_RETENTION deletes them)\n", marked)
		}
	} else {
		fmt.Fprintln(stdout, "on publish:          mark (OUTBOX_ON_PUBLISH): published rows are kept with published_at until OUTBOX_RETENTION")
	}
	var dead, discarded int64
	if err := pool.QueryRow(ctx, `SELECT count(*), count(discarded_at) FROM `+s.outboxTable().DeadLetterIdent()).Scan(&dead, &discarded); err != nil {
		return fmt.Errorf("count dead letters: %w", err)
	}
	fmt.Fprintf(stdout, "dead letters:        %d (%d discarded)\n", dead, discarded)
	if s.order == outbox.Skip {
		fmt.Fprintln(stdout, "held rows:           none (OUTBOX_DEAD_LETTER_ORDER=skip)")
		return nil
	}
	rows, keys, err := st.Held(ctx, 0, 1)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "held rows:           %d of %d keys (held by dead letters: `outbox-relay dlq list`)\n", rows, keys)
	return nil
}

// runDLQ is `outbox-relay dlq list|requeue|discard`.
func runDLQ(ctx context.Context, args, environ []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: outbox-relay dlq list [-limit N] | dlq requeue [--as-new] ID... | dlq discard --reason TEXT ID...")
	}
	s, err := readDBSettings(environ, true)
	if err != nil {
		return err
	}
	switch args[0] {
	case "list":
		fs := flag.NewFlagSet("dlq list", flag.ContinueOnError)
		limit := fs.Int("limit", 100, "most dead letters to list")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		pool, err := s.open(ctx)
		if err != nil {
			return err
		}
		defer pool.Close()
		dead, err := outbox.NewStore(pool, s.outboxTable()).ListDeadLetters(ctx, *limit)
		if err != nil {
			return err
		}
		tw := tabwriter.NewWriter(stdout, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTOPIC\tKEY\tVALUE BYTES\tFAILED AT\tHOLDS\tDISCARDED\tERROR")
		for _, d := range dead {
			value := "null"
			if d.ValueBytes != nil {
				value = strconv.FormatInt(*d.ValueBytes, 10)
			}
			holds := strconv.FormatInt(d.Holds, 10)
			if s.order == outbox.Skip {
				holds = "- (skip)"
			}
			discarded := "-"
			if d.DiscardedAt != nil {
				discarded = d.DiscardedAt.UTC().Format(time.RFC3339) + " " + strconv.Quote(d.DiscardReason)
			}
			fmt.Fprintf(tw, "%d\t%s\t%q\t%s\t%s\t%s\t%s\t%s\n", d.ID, d.Topic, d.Key, value, d.FailedAt.UTC().Format(time.RFC3339), holds, discarded, d.Error)
		}
		return tw.Flush()
	case "requeue":
		fs := flag.NewFlagSet("dlq requeue", flag.ContinueOnError)
		asNew := fs.Bool("as-new", false, "requeue as new rows (new ids, after everything written before), out of their key's order; also for discarded rows")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		ids, err := parseIDs("dlq requeue", fs.Args())
		if err != nil {
			return err
		}
		pool, err := s.open(ctx)
		if err != nil {
			return err
		}
		defer pool.Close()
		st := outbox.NewStore(pool, s.outboxTable())
		if *asNew {
			newIDs, err := st.RequeueAsNew(ctx, ids)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "requeued %d of %d dead letters as new outbox rows %v\n", len(newIDs), len(ids), newIDs)
			return nil
		}
		back, err := st.Requeue(ctx, ids)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "requeued %d of %d dead letters in their original position (ids %v)\n", len(back), len(ids), back)
		if len(back) < len(ids) {
			fmt.Fprintln(stdout, "the others are unknown or discarded: `outbox-relay dlq list` shows them; a discarded row goes back only with --as-new")
		}
		return nil
	case "discard":
		fs := flag.NewFlagSet("dlq discard", flag.ContinueOnError)
		reason := fs.String("reason", "", "why the rows are given up (required; kept with them for audit)")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		// Flags may follow the ids too: dlq discard 7 8 --reason "...".
		rest := fs.Args()
		var idArgs []string
		for len(rest) > 0 {
			idArgs = append(idArgs, rest[0])
			if err := fs.Parse(rest[1:]); err != nil {
				return err
			}
			rest = fs.Args()
		}
		if strings.TrimSpace(*reason) == "" {
			return errors.New("dlq discard: --reason is required: say why the rows are given up (it is kept with them for audit)")
		}
		ids, err := parseIDs("dlq discard", idArgs)
		if err != nil {
			return err
		}
		pool, err := s.open(ctx)
		if err != nil {
			return err
		}
		defer pool.Close()
		done, err := outbox.NewStore(pool, s.outboxTable()).Discard(ctx, ids, *reason)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "discarded %d of %d dead letters %v: their keys are released, the rows stay in the dead-letter table with the reason\n", len(done), len(ids), done)
		return nil
	default:
		return fmt.Errorf("unknown dlq command %q: use list, requeue or discard", args[0])
	}
}

// parseIDs parses the dead-letter ids of a dlq command.
func parseIDs(cmd string, args []string) ([]int64, error) {
	if len(args) == 0 {
		return nil, fmt.Errorf("usage: outbox-relay %s ID... (ids from `outbox-relay dlq list`)", cmd)
	}
	ids := make([]int64, 0, len(args))
	for _, a := range args {
		id, err := strconv.ParseInt(a, 10, 64)
		if err != nil {
			return nil, fmt.Errorf("%s: %q is not an id: give the numeric ids from `outbox-relay dlq list`", cmd, a)
		}
		ids = append(ids, id)
	}
	return ids, nil
}
