package demo

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/tracing/otlpenv"
)

// The ledger service: a second application that consumes the payments
// topic through package inbox and applies each transfer to its own
// accounts table, exactly once. Its tables, in the schema it is given:
// ledger_accounts (id, balance, entries) and the inbox's ledger_inbox_*.
const (
	// LedgerAccounts is the ledger's accounts table.
	LedgerAccounts = "ledger_accounts"
	// LedgerInbox is the table prefix of the ledger's inbox tables.
	LedgerInbox = "ledger_inbox"
	// LedgerGroup is the ledger's default consumer group.
	LedgerGroup = "outbox-demo-ledger"
)

// ledgerSetupLockKey is the first half of the advisory lock SetupLedger
// takes ("ldgr"); the second is hashtext of the schema.
const ledgerSetupLockKey = 1818519410

// SetupLedger creates, if missing, the ledger's tables in schema: n
// accounts at OpeningBalance, and the inbox tables. It drops nothing, so a
// ledger process can call it on every start. It runs in one transaction
// that first takes an advisory lock on the schema, so ledgers started at
// the same moment take turns (CREATE SCHEMA IF NOT EXISTS and CREATE TABLE
// IF NOT EXISTS are not safe against each other: one of two at once fails
// on a duplicate key in the catalog); the later finds everything there.
func SetupLedger(ctx context.Context, pool *pgxpool.Pool, schema string, n int) error {
	tx, err := pool.Begin(ctx)
	if err != nil {
		return fmt.Errorf("set up the ledger in %s: %w", schema, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	if _, err := tx.Exec(ctx, `SELECT pg_advisory_xact_lock($1, hashtext($2))`, ledgerSetupLockKey, schema); err != nil {
		return fmt.Errorf("set up the ledger in %s: take the setup lock: %w", schema, err)
	}
	s := migrations.QuoteIdent(schema)
	stmt := `CREATE SCHEMA IF NOT EXISTS ` + s + `;
CREATE TABLE IF NOT EXISTS ` + s + `.` + LedgerAccounts + ` (
    id      integer PRIMARY KEY,
    balance bigint  NOT NULL,
    entries bigint  NOT NULL DEFAULT 0  -- transfers applied to the account
)`
	if _, err := tx.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("create the ledger's accounts in %s: %w", schema, err)
	}
	if _, err := tx.Exec(ctx, `INSERT INTO `+s+`.`+LedgerAccounts+` (id, balance) SELECT g, $2 FROM generate_series(1, $1::int) g ON CONFLICT (id) DO NOTHING`,
		n, OpeningBalance); err != nil {
		return fmt.Errorf("create %d ledger accounts in %s: %w", n, schema, err)
	}
	m, err := inbox.NewMigrator(tx, schema, LedgerInbox)
	if err != nil {
		return err
	}
	if _, err := m.Up(ctx); err != nil {
		return fmt.Errorf("migrate the ledger's inbox in %s: %w", schema, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("set up the ledger in %s: commit: %w", schema, err)
	}
	return nil
}

// LedgerHandler applies one transfer event to the ledger's accounts in
// schema with one UPDATE, inside the inbox's transaction. The UPDATE is
// deliberately not idempotent (balance = balance + amount): exactly-once
// comes from the inbox, and a transfer applied twice would show in the
// balances. An event that is not a transfer, or names an account the
// ledger does not have, is refused as permanent (dead-lettered).
func LedgerHandler(schema string) inbox.Handler {
	accounts := migrations.QuoteIdent(schema) + "." + LedgerAccounts
	stmt := `UPDATE ` + accounts + `
SET balance = balance + CASE WHEN id = $1 THEN -$3::bigint ELSE $3::bigint END, entries = entries + 1
WHERE id IN ($1, $2)`
	return func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
		var t Transfer
		if err := json.Unmarshal(ev.Value, &t); err != nil || t.TransferID <= 0 || t.From == t.To {
			return inbox.Permanent(fmt.Errorf("outbox row %d is not a transfer: %.80q", ev.OutboxID, ev.Value))
		}
		tag, err := tx.Exec(ctx, stmt, t.From, t.To, t.Amount)
		if err != nil {
			return fmt.Errorf("transfer %d: %w", t.TransferID, err)
		}
		if tag.RowsAffected() != 2 {
			return inbox.Permanent(fmt.Errorf("transfer %d between accounts %d and %d: the ledger has %d of them", t.TransferID, t.From, t.To, tag.RowsAffected()))
		}
		return nil
	}
}

// LedgerDiff compares the balances of the source's accounts table (quoted,
// schema-qualified) with the ledger's in ledgerSchema, and returns one line
// per account that differs (none when they match) and the ledger's total
// entries (two per transfer applied).
func LedgerDiff(ctx context.Context, db interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, sourceAccounts, ledgerSchema string) (diffs []string, entries int64, err error) {
	ledger := migrations.QuoteIdent(ledgerSchema) + "." + LedgerAccounts
	rows, err := db.Query(ctx, `SELECT coalesce(s.id, l.id), s.balance, l.balance, coalesce(l.entries, 0)
FROM `+sourceAccounts+` s FULL JOIN `+ledger+` l ON l.id = s.id ORDER BY 1`)
	if err != nil {
		return nil, 0, fmt.Errorf("compare the ledger with the source: %w", err)
	}
	defer rows.Close()
	for rows.Next() {
		var id int64
		var src, led *int64
		var n int64
		if err := rows.Scan(&id, &src, &led, &n); err != nil {
			return nil, 0, fmt.Errorf("compare the ledger with the source: %w", err)
		}
		entries += n
		switch {
		case src == nil:
			diffs = append(diffs, fmt.Sprintf("account %d: only in the ledger (balance %d)", id, *led))
		case led == nil:
			diffs = append(diffs, fmt.Sprintf("account %d: missing from the ledger (source balance %d)", id, *src))
		case *src != *led:
			diffs = append(diffs, fmt.Sprintf("account %d: source balance %d, ledger %d (%+d)", id, *src, *led, *led-*src))
		}
	}
	return diffs, entries, rows.Err()
}

// ledgerRunner runs the ledger's inbox, and with chaos starts a new
// instance after every crash, as a process supervisor would. Every
// instance has the same InstanceID, so the new one takes the old one's
// partitions at once (as a restarted pod would).
type ledgerRunner struct {
	cfg   inbox.Config
	pool  *pgxpool.Pool
	log   *slog.Logger
	chaos *chaos // nil: no crashes
	out   *printer
	seed  map[int32]int64 // where the ledger starts on the payments topic

	crashes atomic.Int64
	mu      sync.Mutex
	byPoint map[string]int
	total   inbox.Stats // of the instances that stopped
	current *inbox.Inbox
}

// ledgerCrash is the error a chaos failpoint stops the ledger with.
type ledgerCrash struct {
	point     string
	partition int32
	records   int
}

func (c ledgerCrash) Error() string {
	return fmt.Sprintf("simulated crash of the ledger at %s (partition %d, %d records)", c.point, c.partition, c.records)
}

var ledgerCrashWhat = map[string]string{
	inbox.FailBeforeCommit: "inside its database transaction of %s: rolled back, the next instance applies them",
	inbox.FailAfterCommit:  "right after committing %s: the next instance resumes from the offsets in the database",
}

func (lr *ledgerRunner) failpoint(_ context.Context, name, _ string, partition int32, offsets []int64) error {
	if !lr.chaos.fire(name) {
		return nil
	}
	return ledgerCrash{point: name, partition: partition, records: len(offsets)}
}

// run returns nil when ctx ends, or the error that stopped the ledger.
func (lr *ledgerRunner) run(ctx context.Context) error {
	failures := 0
	for first := true; ; first = false {
		opts := []inbox.Option{inbox.WithLogger(lr.log)}
		if lr.chaos != nil {
			opts = append(opts, inbox.WithFailpoint(lr.failpoint))
		}
		in, err := inbox.New(lr.cfg, lr.pool, LedgerHandler(lr.cfg.Schema), opts...)
		if err != nil {
			return fmt.Errorf("ledger: %w", err)
		}
		if first && len(lr.seed) > 0 {
			if err := in.Seed(ctx, Topic, lr.seed); err != nil {
				return fmt.Errorf("ledger: %w", err)
			}
		}
		lr.mu.Lock()
		lr.current = in
		lr.mu.Unlock()
		err = in.Run(ctx)
		lr.mu.Lock()
		st := in.Stats()
		lr.total.Applied += st.Applied
		lr.total.Duplicates += st.Duplicates
		lr.total.Redelivered += st.Redelivered
		lr.total.DeadLettered += st.DeadLettered
		lr.current = nil
		lr.mu.Unlock()
		if ctx.Err() != nil {
			return nil
		}
		var crash ledgerCrash
		switch {
		case errors.As(err, &crash):
			failures = 0
			lr.crashes.Add(1)
			lr.mu.Lock()
			if lr.byPoint == nil {
				lr.byPoint = map[string]int{}
			}
			lr.byPoint[crash.point]++
			lr.mu.Unlock()
			lr.log.Warn("demo: ledger crashed on purpose (-chaos); starting a new instance", "point", crash.point, "partition", crash.partition, "records", crash.records)
			lr.out.event("chaos: ledger killed %s", fmt.Sprintf(ledgerCrashWhat[crash.point], plural(crash.records, "transfer")))
			continue
		case err == nil:
			return errors.New("ledger stopped on its own")
		case failures < maxRelayFailures:
			failures++
			lr.log.Warn("demo: ledger stopped; starting a new instance", "err", err)
			lr.out.event("ledger stopped: %v; starting a new instance", err)
		default:
			return fmt.Errorf("ledger: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// stats sums the counts of every instance so far.
func (lr *ledgerRunner) stats() inbox.Stats {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	s := lr.total
	if lr.current != nil {
		c := lr.current.Stats()
		s.Applied += c.Applied
		s.Duplicates += c.Duplicates
		s.Redelivered += c.Redelivered
		s.DeadLettered += c.DeadLettered
	}
	return s
}

func (lr *ledgerRunner) crashSummary() string {
	lr.mu.Lock()
	defer lr.mu.Unlock()
	if len(lr.byPoint) == 0 {
		return "none happened: run longer, or with a shorter -chaos-every"
	}
	var parts []string
	for p, n := range lr.byPoint {
		parts = append(parts, fmt.Sprintf("%s %d", p, n))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// ledgerApplied counts the events the ledger's inbox recorded as applied.
func ledgerApplied(ctx context.Context, pool *pgxpool.Pool, schema string) (int64, error) {
	var n int64
	err := pool.QueryRow(ctx, `SELECT count(*) FROM `+migrations.QuoteIdent(schema)+`.`+migrations.QuoteIdent(LedgerInbox+"_applied")+` WHERE topic = $1`, Topic).Scan(&n)
	return n, err
}

// RunLedger is the hidden `outbox-relay demo-ledger`: the demo's ledger
// service alone, as a process of its own (the kill -9 tests run it). It
// creates its tables if missing (SetupLedger), consumes the payments topic
// with inbox until SIGINT or SIGTERM, and exits 0. PostgreSQL is
// OUTBOX_DATABASE_URL (default DefaultDatabaseURL); logs are JSON on
// stderr.
func RunLedger(ctx context.Context, args, environ []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("demo-ledger", flag.ContinueOnError)
	fs.SetOutput(stderr)
	schema := fs.String("schema", DefaultSchema, "PostgreSQL `schema` of the ledger's tables (created if missing, never dropped)")
	kafka := fs.String("kafka", "", "Kafka seed brokers, `host:port[,...]` (required)")
	topic := fs.String("topic", Topic, "the payments `topic`")
	group := fs.String("group", LedgerGroup, "consumer `group`")
	instance := fs.String("instance-id", "", "static group membership `id` (a restarted process with the same id takes its partitions back at once)")
	accounts := fs.Int("accounts", 20, "number of ledger accounts, created if missing")
	batch := fs.Int("batch", 100, "most events per database transaction")
	level := fs.String("log-level", "info", "log `level`: debug, info, warn, error")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return nil
		}
		return err
	}
	if *kafka == "" {
		return errors.New("-kafka is required")
	}
	var lv slog.Level
	_ = lv.UnmarshalText([]byte(strings.ToUpper(*level)))
	log := slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: lv}))
	dbURL := databaseURL(environ)
	pool, err := openPool(ctx, dbURL, 8)
	if err != nil {
		return err
	}
	defer pool.Close()
	if err := SetupLedger(ctx, pool, *schema, *accounts); err != nil {
		return err
	}
	tp, stopTracing, err := otlpenv.Provider(ctx, environ, "outbox-relay-ledger")
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		_ = stopTracing(sctx) // best effort: the spans not flushed in 5 s are lost
	}()
	in, err := inbox.New(inbox.Config{
		Brokers:    splitBrokers(*kafka),
		Group:      *group,
		Topics:     []string{*topic},
		Schema:     *schema,
		Table:      LedgerInbox,
		InstanceID: *instance,
		BatchSize:  *batch,
	}, pool, LedgerHandler(*schema), inbox.WithLogger(log), inbox.WithTracerProvider(tp))
	if err != nil {
		return err
	}
	log.Info("ledger starting", "database", relay.RedactURL(dbURL), "schema", *schema, "topic", *topic, "group", *group)
	err = in.Run(ctx)
	st := in.Stats()
	log.Info("ledger stopped", "applied", st.Applied, "duplicates", st.Duplicates, "redelivered", st.Redelivered, "dead_letters", st.DeadLettered, "err", err)
	return err
}

func splitBrokers(s string) []string {
	var out []string
	for b := range strings.SplitSeq(s, ",") {
		if b = strings.TrimSpace(b); b != "" {
			out = append(out, b)
		}
	}
	return out
}

// databaseURL is OUTBOX_DATABASE_URL from environ, or DefaultDatabaseURL.
func databaseURL(environ []string) string {
	url := DefaultDatabaseURL
	for _, kv := range environ {
		if v, ok := strings.CutPrefix(kv, "OUTBOX_DATABASE_URL="); ok && v != "" {
			url = v
		}
	}
	return url
}

// openPool connects to PostgreSQL (relay.OpenPool, without the relay's
// connection settings).
func openPool(ctx context.Context, url string, conns int) (*pgxpool.Pool, error) {
	return relay.OpenPool(ctx, url, conns, nil)
}
