package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/pgauth"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/replication"
	"github.com/outbox-relay/outbox-relay/standby"
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
	// standbys is OUTBOX_STANDBY_NAMES.
	standbys []string
	// source, publication and slot are OUTBOX_SOURCE,
	// OUTBOX_REPLICATION_PUBLICATION and OUTBOX_REPLICATION_SLOT.
	source, publication, slot string
	// auth are the credentials of new connections
	// (OUTBOX_DATABASE_PASSWORD_FILE, OUTBOX_DATABASE_IAM_*).
	auth pgauth.Config
	// environ is the whole environment, for the few sections that need the
	// relay's full configuration (the Kafka settings).
	environ []string
}

func readDBSettings(environ []string, needURL bool) (dbSettings, error) {
	s := dbSettings{schema: "public", table: "outbox", environ: environ}
	if err := relay.KnownVariables().Check(environ); err != nil {
		return s, err
	}
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
		case "OUTBOX_SOURCE":
			s.source = v
		case "OUTBOX_REPLICATION_PUBLICATION":
			s.publication = v
		case "OUTBOX_REPLICATION_SLOT":
			s.slot = v
		case "OUTBOX_STANDBY_NAMES":
			for _, n := range strings.Split(v, ",") {
				if n = strings.TrimSpace(n); n != "" {
					s.standbys = append(s.standbys, n)
				}
			}
		}
	}
	auth, err := pgauth.FromEnviron(environ)
	if err != nil {
		return s, err
	}
	s.auth = auth
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
	return openPool(ctx, s.url, 1, nil, s.auth)
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

// adminRoleHint adds to a "permission denied" (SQLSTATE 42501) of
// `migrate up` what to do about it: the migration creates schemas, tables
// and indexes, which the relay role of the README's grants may not; the
// admin role may. Other errors are returned as they are.
func adminRoleHint(err error) error {
	var pgErr *pgconn.PgError
	if err != nil && errors.As(err, &pgErr) && pgErr.Code == "42501" {
		return fmt.Errorf("%w; run migrate with the admin role (see README grants)", err)
	}
	return err
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
			return adminRoleHint(err)
		}
		if len(ran) == 0 {
			fmt.Fprintf(stdout, "%s is up to date\n", s.outboxTable())
		}
		for _, mig := range ran {
			fmt.Fprintf(stdout, "applied %04d_%s to %s\n", mig.Version, mig.Name, s.outboxTable())
		}
		if err := buildShardIndex(ctx, pool, s, stdout); err != nil {
			return adminRoleHint(err)
		}
		return adminRoleHint(ensurePublication(ctx, pool, s, stdout))
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

// ensurePublication is the end of `migrate up` with OUTBOX_SOURCE=replication:
// the publication of the outbox table's inserts that the relay's slot reads.
func ensurePublication(ctx context.Context, pool *pgxpool.Pool, s dbSettings, stdout io.Writer) error {
	if s.source != "replication" {
		return nil
	}
	name := s.publication
	if name == "" {
		name = replication.DefaultPublication(s.schema, s.table)
	}
	if err := replication.EnsurePublication(ctx, pool, name, s.schema, s.table); err != nil {
		return err
	}
	fmt.Fprintf(stdout, "publication %s publishes the inserts of %s\n", name, s.outboxTable())
	return nil
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

// runStatus is `outbox-relay status`: one section after another
// (statusSections), each printing its lines. It exits non-zero while a
// migration is pending, after saying so.
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
		return fmt.Errorf("%s has %s pending: run `outbox-relay migrate up` first (the relay refuses to start until then)",
			s.outboxTable(), plural(int64(pending), "migration", "migrations"))
	}
	st := &statusRun{s: s, pool: pool, store: outbox.NewStore(pool, s.outboxTable()), out: stdout}
	for _, section := range statusSections() {
		if err := section(ctx, st); err != nil {
			return err
		}
	}
	if st.stopped > 0 {
		return fmt.Errorf("%s of %s stopped until an operator acts: see \"stopped shards\" above and docs/operations.md, \"A stopped shard\"",
			plural(int64(st.stopped), "shard", "shards"), s.outboxTable())
	}
	return nil
}

// statusRun is what every section of `outbox-relay status` reads from and
// writes to.
type statusRun struct {
	s     dbSettings
	pool  *pgxpool.Pool
	store *outbox.Store
	out   io.Writer
	// stopped counts the shards statusStopped found stopped: status then
	// exits non-zero.
	stopped int
}

// line prints one "label: value" line of status, aligned with the others.
func (st *statusRun) line(label, format string, args ...any) {
	fmt.Fprintf(st.out, "%-21s%s\n", label+":", fmt.Sprintf(format, args...))
}

// statusSections are the sections of `outbox-relay status`, in order; a new
// section is one more function here.
func statusSections() []func(context.Context, *statusRun) error {
	return []func(context.Context, *statusRun) error{
		statusIdentity,
		statusOwners,
		statusStopped,
		statusBacklog,
		statusOnPublish,
		statusDeadLetters,
		statusHeld,
		statusStandbys,
		statusReplication,
	}
}

// statusStandbys prints, with OUTBOX_STANDBY_NAMES, whether each named
// standby is connected and how far it is behind the primary: a standby
// missing or behind holds publishing.
func statusStandbys(ctx context.Context, st *statusRun) error {
	if len(st.s.standbys) == 0 {
		st.line("standbys", "none named (OUTBOX_STANDBY_NAMES unset): a fail-over to an asynchronous standby can leave phantoms")
		return nil
	}
	b, err := standby.New(st.pool, st.s.standbys)
	if err != nil {
		return err
	}
	if err := b.CheckAccess(ctx); err != nil {
		return err
	}
	states, err := b.Read(ctx)
	if err != nil {
		return err
	}
	for _, s := range states {
		switch {
		case !s.Connected:
			st.line("standby "+s.Name, "NOT CONNECTED: publishing is held until it streams again (or remove it from OUTBOX_STANDBY_NAMES)")
		case s.LagBytes > 0:
			st.line("standby "+s.Name, "streaming, %d bytes behind (publishing waits for it)", s.LagBytes)
		default:
			st.line("standby "+s.Name, "streaming, caught up")
		}
	}
	return nil
}

// statusIdentity prints what the first relay recorded for the table: shard
// count, relay name, checkpoint topic and delivery mode.
func statusIdentity(ctx context.Context, st *statusRun) error {
	var shards *int
	var name, topic, delivery *string
	if err := st.pool.QueryRow(ctx, `SELECT shards, relay_name, checkpoint_topic, delivery FROM `+st.s.outboxTable().StateIdent()).
		Scan(&shards, &name, &topic, &delivery); err != nil {
		return fmt.Errorf("read the shard count, relay name and delivery mode recorded for %s: %w", st.s.outboxTable(), err)
	}
	const none = "not recorded yet (the first relay records it)"
	orNone := func(v *string) string {
		if v == nil {
			return none
		}
		return *v
	}
	if shards == nil {
		st.line("shards", "%s", none)
	} else {
		st.line("shards", "%d", *shards)
	}
	st.line("relay name", "%s", orNone(name))
	st.line("checkpoint topic", "%s", orNone(topic))
	st.line("delivery", "%s", orNone(delivery))
	return nil
}

// statusOwners prints each shard's last owner and how long ago it renewed
// its lease.
func statusOwners(ctx context.Context, st *statusRun) error {
	rows, err := st.pool.Query(ctx, `SELECT shard, owner, extract(epoch FROM now() - renewed_at)::float8 FROM `+
		st.s.outboxTable().OwnerIdent()+` ORDER BY shard`)
	if err != nil {
		return fmt.Errorf("read the shard owners of %s: %w", st.s.outboxTable(), err)
	}
	type owner struct {
		shard int32
		name  string
		age   float64
	}
	owners, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (owner, error) {
		var o owner
		err := r.Scan(&o.shard, &o.name, &o.age)
		return o, err
	})
	if err != nil {
		return fmt.Errorf("read the shard owners of %s: %w", st.s.outboxTable(), err)
	}
	if len(owners) == 0 {
		st.line("owners", "none yet (no relay has taken a shard)")
		return nil
	}
	for i, o := range owners {
		label := ""
		if i == 0 {
			label = "owners:"
		}
		age := time.Duration(o.age * float64(time.Second)).Round(time.Millisecond)
		fmt.Fprintf(st.out, "%-21sshard %d: %s (lease renewed %s ago)\n", label, o.shard, o.name, age)
	}
	return nil
}

// statusStopped prints the shards an instance stopped until an operator
// acts (recorded in <table>_owner by the instance that stopped them), with
// the reason.
func statusStopped(ctx context.Context, st *statusRun) error {
	rows, err := st.pool.Query(ctx, `SELECT shard, owner, extract(epoch FROM now() - stopped_at)::float8, coalesce(stopped_reason, '') FROM `+
		st.s.outboxTable().OwnerIdent()+` WHERE stopped_at IS NOT NULL ORDER BY shard`)
	if err != nil {
		return fmt.Errorf("read the stopped shards of %s: %w", st.s.outboxTable(), err)
	}
	type stopped struct {
		shard  int32
		owner  string
		age    float64
		reason string
	}
	all, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (stopped, error) {
		var s stopped
		err := r.Scan(&s.shard, &s.owner, &s.age, &s.reason)
		return s, err
	})
	if err != nil {
		return fmt.Errorf("read the stopped shards of %s: %w", st.s.outboxTable(), err)
	}
	st.stopped = len(all)
	if len(all) == 0 {
		st.line("stopped shards", "none")
		return nil
	}
	for i, s := range all {
		label := ""
		if i == 0 {
			label = "stopped shards:"
		}
		age := time.Duration(s.age * float64(time.Second)).Round(time.Second)
		fmt.Fprintf(st.out, "%-21sshard %d: STOPPED %s ago by %s: %s\n", label, s.shard, age, s.owner, s.reason)
	}
	return nil
}

// statusBacklog prints the unpublished rows and the oldest one's age.
func statusBacklog(ctx context.Context, st *statusRun) error {
	b, err := st.store.Backlog(ctx, 0, 1)
	if err != nil {
		return err
	}
	if st.s.source == "replication" {
		// Rows read from the WAL are published without a mark.
		st.line("unpublished rows", "%d not marked (OUTBOX_SOURCE=replication marks no row after the hand-over: what Kafka holds is up to the checkpoint lsn below)", b.Rows)
		return nil
	}
	st.line("unpublished rows", "%d", b.Rows)
	if !b.OldestCreate.IsZero() {
		st.line("oldest unpublished", "%s ago", time.Since(b.OldestCreate).Round(time.Millisecond))
	}
	return nil
}

// statusOnPublish prints OUTBOX_ON_PUBLISH and, in delete mode, the rows a
// relay in mark mode left marked.
func statusOnPublish(ctx context.Context, st *statusRun) error {
	if st.s.onPublish != outbox.Delete {
		st.line("on publish", "mark (OUTBOX_ON_PUBLISH): published rows are kept with published_at until OUTBOX_RETENTION")
		return nil
	}
	// What the table can no longer show: how many rows were published.
	st.line("on publish", "delete (OUTBOX_ON_PUBLISH): published rows are deleted, so the table shows the backlog and dead letters only; what was published is in Kafka: `outbox-relay verify -topics ...`")
	var marked int64
	if err := st.pool.QueryRow(ctx, `SELECT count(*) FROM `+st.s.outboxTable().Ident()+` WHERE published_at IS NOT NULL`).Scan(&marked); err != nil {
		return fmt.Errorf("count rows marked published: %w", err)
	}
	if marked > 0 {
		st.line("marked published", "%d (left by a relay in mark mode; OUTBOX_RETENTION deletes them)", marked)
	}
	return nil
}

// statusDeadLetters prints the dead letters and how many were discarded.
func statusDeadLetters(ctx context.Context, st *statusRun) error {
	var dead, discarded int64
	if err := st.pool.QueryRow(ctx, `SELECT count(*), count(discarded_at) FROM `+st.s.outboxTable().DeadLetterIdent()).Scan(&dead, &discarded); err != nil {
		return fmt.Errorf("count dead letters: %w", err)
	}
	st.line("dead letters", "%d (%d discarded)", dead, discarded)
	return nil
}

// statusHeld prints the rows dead letters hold, and on how many keys.
func statusHeld(ctx context.Context, st *statusRun) error {
	if st.s.order == outbox.Skip {
		st.line("held rows", "none (OUTBOX_DEAD_LETTER_ORDER=skip)")
		return nil
	}
	rows, keys, err := st.store.Held(ctx, 0, 1)
	if err != nil {
		return err
	}
	if rows == 0 {
		st.line("held rows", "none")
		return nil
	}
	st.line("held rows", "%s held on %s (by dead letters: `outbox-relay dlq list`)",
		plural(rows, "row", "rows"), plural(keys, "key", "keys"))
	return nil
}

// plural is n and the noun for n: "1 key", "2 keys".
func plural(n int64, one, many string) string {
	if n == 1 {
		return "1 " + one
	}
	return strconv.FormatInt(n, 10) + " " + many
}

// runDLQ is `outbox-relay dlq list|requeue|discard`.
func runDLQ(ctx context.Context, args, environ []string, stdout io.Writer) error {
	if len(args) == 0 {
		return errors.New("usage: outbox-relay dlq list [-limit N] [-order newest|oldest] [-json] | dlq requeue [--as-new] ID... | dlq discard --reason TEXT ID...")
	}
	s, err := readDBSettings(environ, true)
	if err != nil {
		return err
	}
	switch args[0] {
	case "list":
		fs := flag.NewFlagSet("dlq list", flag.ContinueOnError)
		limit := fs.Int("limit", 100, "most dead letters to list")
		order := fs.String("order", "newest", "newest (highest id first) or oldest")
		asJSON := fs.Bool("json", false, "print the dead letters as JSON, one object each in an array, with the whole topic, key and error")
		if err := fs.Parse(args[1:]); err != nil {
			return err
		}
		if *order != "newest" && *order != "oldest" {
			return fmt.Errorf("dlq list: -order %q: use newest or oldest", *order)
		}
		pool, err := s.open(ctx)
		if err != nil {
			return err
		}
		defer pool.Close()
		dead, err := outbox.NewStore(pool, s.outboxTable()).ListDeadLettersOrdered(ctx, *limit, *order == "newest")
		if err != nil {
			return err
		}
		if *asJSON {
			return writeDeadLettersJSON(stdout, dead, s.order)
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
			fmt.Fprintf(tw, "%d\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n", d.ID, truncate(d.Topic, listTopicWidth), truncate(strconv.Quote(string(d.Key)), listKeyWidth),
				value, d.FailedAt.UTC().Format(time.RFC3339), holds, discarded, d.Error)
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
			known, err := st.DeadLetterIDs(ctx, ids)
			if err != nil {
				return err
			}
			newIDs, err := st.RequeueAsNew(ctx, ids)
			if err != nil {
				return err
			}
			fmt.Fprintf(stdout, "requeued %d of %d dead letters as new outbox rows %v\n", len(newIDs), len(ids), newIDs)
			if unknown := missingIDs(ids, known); len(unknown) > 0 {
				return fmt.Errorf("no dead letter has id %v: `outbox-relay dlq list` shows the ids", unknown)
			}
			return nil
		}
		rep, err := st.RequeueReport(ctx, ids)
		if err != nil {
			return err
		}
		fmt.Fprintf(stdout, "requeued %d of %d dead letters in their original position (ids %v)\n", len(rep.Moved), len(ids), rep.Moved)
		var problems []string
		if len(rep.Overtaken) > 0 {
			problems = append(problems, (&outbox.OvertakenError{Overtaken: rep.Overtaken}).Error()+
				" (did someone change the dead letter's topic or key? rows of a topic and key it did not hold went out meanwhile)")
		}
		if len(rep.Discarded) > 0 {
			problems = append(problems, fmt.Sprintf("%v discarded: a discarded dead letter goes back only with --as-new", rep.Discarded))
		}
		if len(rep.Unknown) > 0 {
			problems = append(problems, fmt.Sprintf("no dead letter has id %v: `outbox-relay dlq list` shows the ids", rep.Unknown))
		}
		if len(problems) > 0 {
			return errors.New(strings.Join(problems, "; "))
		}
		if s.onPublish == outbox.Delete && len(rep.Moved) > 0 {
			fmt.Fprintln(stdout, "OUTBOX_ON_PUBLISH=delete: published rows are gone, so requeue could not check that no later row of their topic and key is in Kafka already; if you changed a dead letter's topic or key, use --as-new")
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

// The widths of the columns of `dlq list` that a row can make arbitrarily
// long; -json prints them whole.
const (
	listTopicWidth = 40
	listKeyWidth   = 40
)

// truncate shortens s to at most width characters, ending in "...".
func truncate(s string, width int) string {
	r := []rune(s)
	if len(r) <= width {
		return s
	}
	return string(r[:width-3]) + "..."
}

// deadLetterJSON is one dead letter in `dlq list -json`.
type deadLetterJSON struct {
	ID            int64           `json:"id"`
	Topic         string          `json:"topic"`
	Key           *string         `json:"key"`         // as text; null for a keyless row
	KeyBase64     []byte          `json:"key_base64"`  // the key's bytes
	ValueBytes    *int            `json:"value_bytes"` // null for a tombstone
	Headers       json.RawMessage `json:"headers"`
	Partition     *int32          `json:"partition"`
	CreatedAt     time.Time       `json:"created_at"`
	FailedAt      time.Time       `json:"failed_at"`
	Error         string          `json:"error"`
	Holds         *int64          `json:"holds"` // null under OUTBOX_DEAD_LETTER_ORDER=skip
	DiscardedAt   *time.Time      `json:"discarded_at"`
	DiscardReason string          `json:"discard_reason,omitempty"`
}

// writeDeadLettersJSON prints dead as a JSON array (`dlq list -json`).
func writeDeadLettersJSON(w io.Writer, dead []outbox.DeadRow, order outbox.DeadLetterOrder) error {
	out := make([]deadLetterJSON, 0, len(dead))
	for _, d := range dead {
		j := deadLetterJSON{ID: d.ID, Topic: d.Topic, KeyBase64: d.Key, Headers: json.RawMessage("null"), Partition: d.Partition, CreatedAt: d.CreatedAt.UTC(),
			FailedAt: d.FailedAt.UTC(), Error: d.Error, DiscardedAt: d.DiscardedAt, DiscardReason: d.DiscardReason}
		if d.Key != nil {
			k := string(d.Key)
			j.Key = &k
		}
		if d.ValueBytes != nil {
			n := int(*d.ValueBytes)
			j.ValueBytes = &n
		}
		if d.Headers != nil {
			j.Headers = json.RawMessage(d.Headers)
		}
		if order != outbox.Skip {
			h := d.Holds
			j.Holds = &h
		}
		out = append(out, j)
	}
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(out)
}

// missingIDs are the ids not in known, in the order given.
func missingIDs(ids, known []int64) []int64 {
	var out []int64
	for _, id := range ids {
		if !slices.Contains(known, id) && !slices.Contains(out, id) {
			out = append(out, id)
		}
	}
	return out
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
