// Package demo is `outbox-relay demo`: a payments application that writes
// transfers and outbox rows to PostgreSQL in one transaction, the relay, a
// read_committed checker that sees every event exactly once and in order
// per account, and a ledger service that consumes the events through
// package inbox and applies each transfer to its own accounts, exactly
// once; the summary compares the ledger's balances with the source's.
// With -chaos the relay and the ledger's consumer are killed again and
// again while the simulator writes.
//
// It runs against an embedded kfake cluster or a real one (-kafka), on the
// PostgreSQL of OUTBOX_DATABASE_URL, in a schema of its own. RunLedger is
// the ledger alone, as a process (the hidden `outbox-relay demo-ledger`).
package demo

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

const (
	// DefaultDatabaseURL is the PostgreSQL the demo uses without
	// OUTBOX_DATABASE_URL.
	DefaultDatabaseURL = "postgres://postgres@127.0.0.1:5432/postgres"
	// DefaultSchema is the demo's own schema; -schema must start with it,
	// because the demo drops the schema it is given.
	DefaultSchema = "outbox_demo"
	// demoPartitions is the partition count of the payments topic when the
	// demo creates it.
	demoPartitions = 6
	// missingGrace is how long a committed transfer may take to reach the
	// consumer before the live line counts it as missing.
	missingGrace = 5 * time.Second
	// catchUpTimeout bounds the wait for the consumer at the end.
	catchUpTimeout = 30 * time.Second
)

// demoFlags are the flags of `outbox-relay demo`.
type demoFlags struct {
	events     int64
	accounts   int
	writers    int
	rate       int
	shards     int
	kafka      string
	chaos      bool
	chaosEvery time.Duration
	delivery   string
	schema     string
	logPath    string
}

func parseDemoFlags(args []string, stderr io.Writer) (demoFlags, error) {
	var f demoFlags
	fs := flag.NewFlagSet("demo", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.Int64Var(&f.events, "events", 0, "stop after `N` transfers are written and verified; 0 runs until Ctrl-C")
	fs.IntVar(&f.accounts, "accounts", 20, "number of accounts (Kafka keys)")
	fs.IntVar(&f.writers, "writers", 4, "concurrent writers (database connections)")
	fs.IntVar(&f.rate, "rate", 500, "transfers per second over all writers; 0 is as fast as possible")
	fs.IntVar(&f.shards, "shards", 1, "relay shards (Kafka transactional ids)")
	fs.StringVar(&f.kafka, "kafka", "", "use the Kafka cluster at `host:port[,host:port...]` instead of the embedded one")
	fs.BoolVar(&f.chaos, "chaos", false, "crash the relay every few seconds, inside and around its Kafka transaction, and the ledger's consumer, inside and after its database transaction, and start new ones")
	fs.DurationVar(&f.chaosEvery, "chaos-every", 3*time.Second, "mean time between -chaos crashes")
	fs.StringVar(&f.delivery, "delivery", "exactly-once", "delivery `mode` of the relay: exactly-once, at-least-once or at-most-once (with -chaos, the last two show the duplicates or losses they allow)")
	fs.StringVar(&f.schema, "schema", DefaultSchema, "PostgreSQL `schema` of the demo, dropped and created again; must start with "+DefaultSchema)
	fs.StringVar(&f.logPath, "log", "", "relay log `file` (JSON, info level), - for stderr (warn level) (default: a new file "+filepath.Join(os.TempDir(), "outbox-relay-SCHEMA-*.log")+", named when the demo starts)")
	fs.Usage = func() {
		fmt.Fprint(fs.Output(), `Usage: outbox-relay demo [flags]

Runs a payments simulator that writes transfers and outbox rows to PostgreSQL
(OUTBOX_DATABASE_URL, default `+DefaultDatabaseURL+`),
the relay, a read_committed consumer that checks every event arrives
exactly once and in order per account, and a ledger service that applies
every transfer to its own accounts through package inbox, exactly once,
against an embedded Kafka cluster.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	var problems []string
	if fs.NArg() > 0 {
		problems = append(problems, fmt.Sprintf("unexpected argument %q", fs.Arg(0)))
	}
	if f.events < 0 {
		problems = append(problems, "-events must be 0 (until Ctrl-C) or more")
	}
	if f.accounts < 2 {
		problems = append(problems, "-accounts must be at least 2: a transfer needs two accounts")
	}
	if f.writers < 1 || f.writers > 256 {
		problems = append(problems, "-writers must be 1 to 256")
	}
	if f.rate < 0 {
		problems = append(problems, "-rate must be 0 (as fast as possible) or more")
	}
	if f.shards < 1 || f.shards > 64 {
		problems = append(problems, "-shards must be 1 to 64")
	}
	if f.chaosEvery <= 0 {
		problems = append(problems, "-chaos-every must be a positive duration, such as 3s")
	}
	if !strings.HasPrefix(f.schema, DefaultSchema) {
		problems = append(problems, fmt.Sprintf("-schema %q: the demo drops its schema, so the name must start with %q", f.schema, DefaultSchema))
	} else if err := migrations.CheckNames(f.schema, "outbox"); err != nil {
		problems = append(problems, "-schema: "+err.Error())
	}
	if len(problems) > 0 {
		return f, errors.New(strings.Join(problems, "; "))
	}
	return f, nil
}

// Run is `outbox-relay demo`: an embedded Kafka cluster, a payments
// simulator writing transfers and outbox rows to PostgreSQL, the relay, and a
// read_committed consumer that checks that every event arrives exactly once
// and in order per account. It returns an error when the check fails.
func Run(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	f, err := parseDemoFlags(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return nil
	}
	if err != nil {
		return err
	}
	d := &demo{f: f, out: newPrinter(stdout), dbURL: databaseURL(environ)}
	defer d.close()
	if err := d.setup(ctx, stderr); err != nil {
		return err
	}
	d.printPlan()
	return d.run(ctx)
}

// demo is one run of `outbox-relay demo`.
type demo struct {
	f       demoFlags
	out     *printer
	dbURL   string
	closers []func() // run by close, last first

	log      *slog.Logger
	logWhere string
	pool     *pgxpool.Pool
	table    outbox.Table
	accounts string // quoted, schema-qualified
	brokers  []string
	kafka    string // where the brokers are
	start    map[string]map[int32]kgo.Offset
	consumer *kgo.Client
	cfg      relay.Config
	ledger   inbox.Config
}

func (d *demo) close() {
	for i := len(d.closers) - 1; i >= 0; i-- {
		d.closers[i]()
	}
}

// setup prepares the log, the database, Kafka and the checker's consumer.
func (d *demo) setup(ctx context.Context, stderr io.Writer) error {
	var closeLog func()
	var err error
	d.log, d.logWhere, closeLog, err = demoLogger(d.f.logPath, d.f.schema, stderr)
	if err != nil {
		return err
	}
	d.closers = append(d.closers, closeLog)

	// PostgreSQL: the demo's own schema, accounts and outbox, and the
	// ledger's accounts and inbox tables.
	if d.pool, err = openPool(ctx, d.dbURL, d.f.writers+d.f.shards+ledgerConcurrency+4); err != nil {
		return err
	}
	d.closers = append(d.closers, d.pool.Close)
	if err := setupSchema(ctx, d.pool, d.f.schema, d.f.accounts); err != nil {
		return err
	}
	if err := SetupLedger(ctx, d.pool, d.f.schema, d.f.accounts); err != nil {
		return err
	}
	d.table = outbox.Table{Schema: d.f.schema, Name: "outbox"}
	d.accounts = migrations.QuoteIdent(d.f.schema) + ".accounts"

	// Kafka: the embedded cluster (or the user's), the payments topic, and
	// the checker's consumer from the topic's current end.
	var closeKafka func()
	if d.brokers, d.kafka, closeKafka, err = startDemoKafka(d.f.kafka); err != nil {
		return err
	}
	d.closers = append(d.closers, closeKafka)
	if d.start, err = preparePaymentsTopic(ctx, d.brokers); err != nil {
		return err
	}
	d.consumer, err = kgo.NewClient(
		kgo.SeedBrokers(d.brokers...),
		kgo.ConsumePartitions(d.start),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(250*time.Millisecond),
		kgo.ClientID("outbox-demo-checker"),
	)
	if err != nil {
		return fmt.Errorf("consumer: %w", err)
	}
	d.closers = append(d.closers, d.consumer.Close)

	// The relay's defaults (as `outbox-relay run` reads them), then the
	// demo's settings.
	if d.cfg, err = relay.LoadConfig([]string{"OUTBOX_DATABASE_URL=" + d.dbURL, "OUTBOX_KAFKA_BROKERS=" + strings.Join(d.brokers, ",")}); err != nil {
		return fmt.Errorf("relay configuration: %w", err)
	}
	d.cfg.Schema, d.cfg.Table = d.f.schema, "outbox"
	d.cfg.RelayName = "outbox-demo"
	d.cfg.CheckpointTopic = "outbox-demo-checkpoints-" + randomHex(4)
	d.cfg.Shards, d.cfg.Delivery, d.cfg.BatchSize = d.f.shards, d.f.delivery, 500
	d.cfg.TransactionTimeout, d.cfg.DeliveryTimeout, d.cfg.ShutdownTimeout = 10*time.Second, 30*time.Second, 10*time.Second
	d.cfg.ClientID = "outbox-demo"
	d.cfg.Retention = 0 // keep published rows, to look at after the demo
	d.cfg.MetricsAddr = ""
	if err := d.cfg.Validate(); err != nil {
		return fmt.Errorf("relay configuration: %w", err)
	}
	// The ledger: its own consumer group (one per run, so that two demos
	// on one external cluster do not share partitions), one static
	// instance restarted after each -chaos crash.
	id := LedgerGroup + "-" + randomHex(4)
	d.ledger = inbox.Config{
		Brokers:         d.brokers,
		Group:           id,
		Topics:          []string{Topic},
		Schema:          d.f.schema,
		Table:           LedgerInbox,
		InstanceID:      id + "-0",
		BatchSize:       100,
		Concurrency:     ledgerConcurrency,
		CommitInterval:  time.Second,
		ShutdownTimeout: 10 * time.Second,
		KafkaOptions:    []kgo.Opt{kgo.FetchMaxWait(250 * time.Millisecond), kgo.ClientID("outbox-demo-ledger")},
	}
	return nil
}

// ledgerConcurrency is how many partitions the ledger applies at once:
// one, because every partition's transfers update the same few hot
// accounts, and concurrent transactions that each lock many of them in
// event order deadlock (PostgreSQL resolves it by aborting one, which the
// inbox retries, but slowly).
const ledgerConcurrency = 1

// printPlan says what runs where, and how to watch.
func (d *demo) printPlan() {
	f, out := d.f, d.out
	until := "until Ctrl-C"
	if f.events > 0 {
		until = fmt.Sprintf("until %d transfers are verified (or Ctrl-C)", f.events)
	}
	rate := "as fast as they can"
	if f.rate > 0 {
		rate = fmt.Sprintf("%d transfers/s in total", f.rate)
	}
	out.linef("outbox-relay demo: payment transfers from PostgreSQL to Kafka, exactly once")
	out.linef("")
	out.linef("PostgreSQL  %s", relay.RedactURL(d.dbURL))
	out.linef("            schema %s (dropped and created again): accounts (%d rows), outbox;", f.schema, f.accounts)
	out.linef("            the ledger's %s and %s_* (its inbox)", LedgerAccounts, LedgerInbox)
	out.linef("Kafka       %s: %s", d.kafka, strings.Join(d.brokers, ","))
	out.linef("            topic %s (%d partitions); relay checkpoints in topic %s", Topic, len(d.start[Topic]), d.cfg.CheckpointTopic)
	out.linef("Relay       %s, %s, %s, batches of up to %d rows", d.cfg.RelayName, d.cfg.Delivery, plural(f.shards, "shard"), d.cfg.BatchSize)
	out.linef("            logs: %s", d.logWhere)
	out.linef("Writers     %d, %s, %s", f.writers, rate, until)
	out.linef("            each transfer: one transaction that debits one account, credits another")
	out.linef("            and writes one outbox row (key = debited account, seq = its transfer count)")
	out.linef("Checker     read_committed consumer: every event once (outbox-id header), seq 1, 2, 3...")
	out.linef("            per account, on one partition")
	out.linef("Ledger      a second service: consumer group %s reads the events through package inbox", d.ledger.Group)
	out.linef("            and applies each transfer to %s in the transaction that records it applied", LedgerAccounts)
	out.linef("            (dedupe by event id, offsets in PostgreSQL); its balances must equal the source's")
	if f.chaos {
		out.linef("Chaos       the relay crashes about every %s and a new one takes over;", f.chaosEvery)
		out.linef("            so does the ledger's consumer, inside and right after its database transaction")
	}
	out.linef("")
	out.linef("Watch the events with kcat while the demo runs:")
	out.linef("  kcat -C -b %s -t %s -X isolation.level=read_committed -f '%%p/%%o key=%%k %%h %%s\\n'", strings.Join(d.brokers, ","), Topic)
	out.linef("")
}

// run runs writers, relay and checker until -events transfers are verified
// or ctx ends, then stops them in order and prints the summary.
func (d *demo) run(ctx context.Context) error {
	// Ctrl-C ends ctx; what runs here stops in its own order, on work.
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	check := newChecker()

	consumerCtx, stopConsumer := context.WithCancel(work)
	consumerT := goTask(func() error { consume(consumerCtx, d.consumer, check, d.log); return nil })
	defer func() { stopConsumer(); <-consumerT.done }()

	var ch *chaos
	if d.f.chaos {
		ch = &chaos{points: crashPointsOf(d.cfg.Delivery)}
		go ch.run(work, d.f.chaosEvery)
	}
	runner := &relayRunner{cfg: d.cfg, pool: d.pool, log: d.log, chaos: ch, out: d.out}
	relayCtx, stopRelay := context.WithCancel(work)
	relayT := goTask(func() error { return runner.run(relayCtx) })
	defer func() { stopRelay(); <-relayT.done }()

	var lch *chaos
	if d.f.chaos {
		lch = &chaos{points: []string{inbox.FailBeforeCommit, inbox.FailAfterCommit}}
		go lch.run(work, d.f.chaosEvery)
	}
	seed := map[int32]int64{}
	for p, o := range d.start[Topic] {
		seed[p] = o.EpochOffset().Offset
	}
	ledger := &ledgerRunner{cfg: d.ledger, pool: d.pool, log: d.log, chaos: lch, out: d.out, seed: seed}
	ledgerCtx, stopLedger := context.WithCancel(work)
	ledgerT := goTask(func() error { return ledger.run(ledgerCtx) })
	defer func() { stopLedger(); <-ledgerT.done }()

	sim := &simulator{pool: d.pool, accounts: d.accounts, table: d.table, n: d.f.accounts, events: d.f.events,
		limit: newLimiter(d.f.rate), check: check, quit: make(chan struct{})}
	began := time.Now()
	writersT := goTask(func() error { return sim.run(d.f.writers) })
	defer func() { sim.stop(); <-writersT.done }()

	st := &statusLine{out: d.out, check: check, pool: d.pool, table: d.table, schema: d.f.schema, began: began, chaos: runner, ledger: ledger}
	tick := time.NewTicker(time.Second)
	defer tick.Stop()
	poll := time.NewTicker(20 * time.Millisecond)
	defer poll.Stop()
	writersDone := writersT.done
	interrupted := false
running:
	for {
		select {
		case <-ctx.Done():
			interrupted = true
			break running
		case <-writersDone:
			if writersT.err != nil {
				d.out.endStatus()
				return writersT.err
			}
			writersDone = nil // -events written; wait for the checker
		case <-relayT.done:
			d.out.endStatus()
			return relayStopped(relayT.err)
		case <-ledgerT.done:
			d.out.endStatus()
			return ledgerStopped(ledgerT.err)
		case <-tick.C:
			st.print(work)
		case <-poll.C:
			if written, ok := check.caughtUp(); d.f.events > 0 && ok && written >= d.f.events {
				break running
			}
		}
	}

	// Stop the writers (a transfer in progress commits) and the crashes.
	sim.stop()
	<-writersT.done
	if writersT.err != nil {
		d.out.endStatus()
		return writersT.err
	}
	if ch != nil {
		ch.stop()
		lch.stop()
	}
	if interrupted {
		written, _ := check.caughtUp()
		d.out.event("stopping: writers stopped after %d transfers; waiting up to %s for the checker to catch up", written, catchUpTimeout)
	}
	// Wait until the checker saw every transfer, every outbox row is
	// marked (a relay started after a chaos crash may still be marking rows
	// from its checkpoint) and the ledger applied every event the checker
	// saw.
	deadline := time.Now().Add(catchUpTimeout)
	var elapsed time.Duration
	for time.Now().Before(deadline) {
		if elapsed == 0 {
			if _, ok := check.caughtUp(); ok {
				elapsed = time.Since(began)
			}
		}
		if elapsed != 0 && allMarked(work, d.pool, d.table) && ledgerCaughtUp(work, d.pool, d.f.schema, check) {
			break
		}
		select {
		case <-relayT.done:
			d.out.endStatus()
			return relayStopped(relayT.err)
		case <-ledgerT.done:
			d.out.endStatus()
			return ledgerStopped(ledgerT.err)
		case <-tick.C:
			st.print(work)
		case <-poll.C:
		}
	}
	if elapsed == 0 {
		elapsed = time.Since(began)
	}
	st.print(work)
	d.out.endStatus()

	// Stop the relay cleanly, and keep reading a little after it stopped: a
	// duplicate would arrive now.
	stopRelay()
	<-relayT.done
	if relayT.err != nil {
		return relayT.err
	}
	time.Sleep(time.Second)
	stopConsumer()
	<-consumerT.done
	stopLedger()
	<-ledgerT.done
	if ledgerT.err != nil {
		return ledgerT.err
	}
	return d.summarize(work, check, runner, ledger, elapsed)
}

// ledgerCaughtUp reports whether the ledger applied as many events as the
// checker verified.
func ledgerCaughtUp(ctx context.Context, pool *pgxpool.Pool, schema string, check *checker) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	n, err := ledgerApplied(ctx, pool, schema)
	return err == nil && n >= check.snapshot(0).verified
}

func ledgerStopped(err error) error {
	if err == nil {
		return errors.New("ledger stopped on its own")
	}
	return err
}

// allMarked reports whether every outbox row is marked published.
func allMarked(ctx context.Context, pool *pgxpool.Pool, table outbox.Table) bool {
	ctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	var none bool
	err := pool.QueryRow(ctx, `SELECT NOT EXISTS (SELECT FROM `+table.Ident()+` WHERE published_at IS NULL)`).Scan(&none)
	return err == nil && none
}

func relayStopped(err error) error {
	if err == nil {
		return errors.New("relay stopped on its own")
	}
	return err
}

// summarize prints the final counts and the verdict, and returns an error
// when the check failed.
func (d *demo) summarize(ctx context.Context, check *checker, runner *relayRunner, ledger *ledgerRunner, elapsed time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	defer cancel()
	c := check.snapshot(0)
	c.unexpected += c.early // consumed, yet no writer committed them
	var published, unpublished int64
	err := d.pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE published_at IS NOT NULL), count(*) FILTER (WHERE published_at IS NULL) FROM `+d.table.Ident()).
		Scan(&published, &unpublished)
	if err != nil {
		return fmt.Errorf("count published rows: %w", err)
	}
	total, err := balanceTotal(ctx, d.pool, d.accounts)
	if err != nil {
		return fmt.Errorf("sum balances: %w", err)
	}
	wantTotal := int64(d.f.accounts) * OpeningBalance
	applied, err := ledgerApplied(ctx, d.pool, d.f.schema)
	if err != nil {
		return fmt.Errorf("count the ledger's applied events: %w", err)
	}
	diffs, entries, err := LedgerDiff(ctx, d.pool, d.accounts, d.f.schema)
	if err != nil {
		return err
	}
	ls := ledger.stats()
	var ledgerProblems []string
	if applied != c.written {
		ledgerProblems = append(ledgerProblems, fmt.Sprintf("the ledger applied %d transfers, %d were committed", applied, c.written))
	}
	if entries != 2*applied {
		ledgerProblems = append(ledgerProblems, fmt.Sprintf("the ledger's accounts have %d entries for %d transfers (want 2 each)", entries, applied))
	}
	if ls.DeadLettered > 0 {
		ledgerProblems = append(ledgerProblems, fmt.Sprintf("%d events in the ledger's dead-letter table %s.%s_dead_letter", ls.DeadLettered, d.f.schema, LedgerInbox))
	}
	ledgerProblems = append(ledgerProblems, diffs...)
	rate := 0.0
	if elapsed > 0 {
		rate = float64(c.verified) / elapsed.Seconds()
	}

	out := d.out
	line := func(key string, value any, note string) {
		out.linef("  %-16s %s", fmt.Sprintf("%s=%v", key, value), note)
	}
	out.linef("")
	out.linef("summary")
	line("written", c.written, "transfers committed in PostgreSQL (2 account rows + 1 outbox row each)")
	note := "outbox rows marked published by the relay"
	if unpublished > 0 {
		note += fmt.Sprintf("; %d not yet (the next relay marks them from its checkpoint)", unpublished)
	}
	line("published", published, note)
	line("verified", c.verified, "events consumed with isolation.level=read_committed")
	line("duplicates", c.duplicates, "events delivered more than once")
	line("missing", c.missing, "transfers committed but never delivered")
	line("out_of_order", c.outOfOrder, "events out of seq order for their account, or on another partition")
	line("unexpected", c.unexpected, "events that match no committed transfer")
	if total == wantTotal {
		line("balance_total", total, fmt.Sprintf("unchanged: %d accounts x %d", d.f.accounts, OpeningBalance))
	} else {
		line("balance_total", total, fmt.Sprintf("CHANGED: want %d accounts x %d = %d", d.f.accounts, OpeningBalance, wantTotal))
	}
	line("ledger_applied", applied, "transfers the ledger applied through the inbox, each event id once")
	line("ledger_skipped", ls.Duplicates+ls.Redelivered, "records the ledger's inbox skipped: an event id already applied, or an offset below the stored one")
	if len(diffs) == 0 {
		line("ledger_balances", "equal", fmt.Sprintf("all %d ledger balances equal the source's", d.f.accounts))
	} else {
		line("ledger_balances", "DIFFER", fmt.Sprintf("%d of %d ledger balances differ from the source's", len(diffs), d.f.accounts))
	}
	if d.f.chaos {
		line("relay_crashes", runner.crashes.Load(), runner.crashSummary())
		line("ledger_crashes", ledger.crashes.Load(), ledger.crashSummary())
	}
	line("elapsed", elapsed.Round(10*time.Millisecond), fmt.Sprintf("events/s=%.0f", rate))

	kafkaOK := c.duplicates+c.missing+c.outOfOrder+c.unexpected == 0 && total == wantTotal
	if kafkaOK && len(ledgerProblems) == 0 {
		out.linef("PASS: %d transfers reached Kafka exactly once, in order per account, and the ledger applied each once: its balances equal the source's", c.verified)
		return nil
	}
	if !kafkaOK {
		out.linef("FAIL: %d duplicates, %d missing, %d out of order, %d unexpected, balance total %d (want %d)",
			c.duplicates, c.missing, c.outOfOrder, c.unexpected, total, wantTotal)
		switch d.cfg.Delivery {
		case "at-least-once":
			out.linef("  (-delivery at-least-once: a crash between Kafka's acknowledgement and the mark sends the batch again; that is what exactly-once prevents)")
		case "at-most-once":
			out.linef("  (-delivery at-most-once: a crash between the mark and the send loses the batch; that is what exactly-once prevents)")
		}
		for _, p := range c.problems {
			out.linef("  %s", p)
		}
		if len(c.missingIDs) > 0 {
			out.linef("  missing transfer ids (first %d): %v", len(c.missingIDs), c.missingIDs)
		}
		out.linef("relay logs: %s; outbox rows: SELECT * FROM %s", d.logWhere, d.table.Ident())
	}
	if len(ledgerProblems) > 0 {
		out.linef("FAIL: the ledger does not match the source")
		for n, p := range ledgerProblems {
			if n == maxProblems {
				out.linef("  ... %d more", len(ledgerProblems)-n)
				break
			}
			out.linef("  %s", p)
		}
		out.linef("ledger tables: %s.%s, %s.%s_applied, %s.%s_dead_letter", d.f.schema, LedgerAccounts, d.f.schema, LedgerInbox, d.f.schema, LedgerInbox)
	} else if c.duplicates > 0 {
		out.linef("the ledger's inbox skipped the %d duplicates (same event id): its balances equal the source's all the same", c.duplicates)
	}
	if !kafkaOK {
		return fmt.Errorf("exactly-once check failed: %d duplicates, %d missing, %d out of order, %d unexpected",
			c.duplicates, c.missing, c.outOfOrder, c.unexpected)
	}
	return fmt.Errorf("ledger check failed: %s", ledgerProblems[0])
}

// statusLine prints the live line, about once per second.
type statusLine struct {
	out    *printer
	check  *checker
	pool   *pgxpool.Pool
	table  outbox.Table
	schema string
	began  time.Time
	chaos  *relayRunner
	ledger *ledgerRunner

	header       bool
	lastAt       time.Time
	lastVerified int64
}

func (s *statusLine) print(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, 900*time.Millisecond)
	defer cancel()
	published := "?"
	var n int64
	if err := s.pool.QueryRow(ctx, `SELECT count(*) FROM `+s.table.Ident()+` WHERE published_at IS NOT NULL`).Scan(&n); err == nil {
		published = fmt.Sprint(n)
	}
	ledger := "?"
	if n, err := ledgerApplied(ctx, s.pool, s.schema); err == nil {
		ledger = fmt.Sprint(n)
	}
	c := s.check.snapshot(missingGrace)
	now := time.Now()
	since := s.began
	if !s.lastAt.IsZero() {
		since = s.lastAt
	}
	rate := 0.0
	if d := now.Sub(since).Seconds(); d > 0 {
		rate = float64(c.verified-s.lastVerified) / d
	}
	s.lastAt, s.lastVerified = now, c.verified
	chaos := s.chaos.chaos != nil
	if !s.header {
		s.header = true
		h := "  time  written  published  verified    lag  dup  missing  out-of-order   ev/s   ledger"
		if chaos {
			h += "  crashes  ledger-crashes"
		}
		s.out.linef("%s", h)
	}
	line := fmt.Sprintf("%5.0fs  %7d  %9s  %8d  %5d  %3d  %7d  %12d  %5.0f  %7s",
		now.Sub(s.began).Seconds(), c.written, published, c.verified, max(0, c.written-c.verified),
		c.duplicates, c.missing, c.outOfOrder, rate, ledger)
	if chaos {
		line += fmt.Sprintf("  %7d  %14d", s.chaos.crashes.Load(), s.ledger.crashes.Load())
	}
	s.out.status(line)
}

// demoLogger returns the relay's logger and says where its lines go: path
// (created or truncated), or stderr at warn level when path is "-".
func demoLogger(path, schema string, stderr io.Writer) (*slog.Logger, string, func(), error) {
	if path == "-" {
		return slog.New(slog.NewJSONHandler(stderr, &slog.HandlerOptions{Level: slog.LevelWarn})), "stderr (JSON, warn level)", func() {}, nil
	}
	var file *os.File
	var err error
	if path == "" {
		// A new file of its own, at a name no one can guess beforehand (so
		// no one can plant a link there), readable by its owner only.
		file, err = os.CreateTemp("", "outbox-relay-"+schema+"-*.log")
	} else {
		file, err = os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	}
	if err != nil {
		return nil, "", nil, fmt.Errorf("relay log file: %w (choose another with -log FILE, or -log - for stderr)", err)
	}
	log := slog.New(slog.NewJSONHandler(file, &slog.HandlerOptions{Level: slog.LevelInfo}))
	return log, file.Name() + " (JSON)", func() { file.Close() }, nil
}

// startDemoKafka starts the embedded cluster, or returns the user's.
func startDemoKafka(external string) (brokers []string, where string, closeFn func(), err error) {
	if external != "" {
		return splitBrokers(external), "external cluster", func() {}, nil
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(3))
	if err != nil {
		return nil, "", nil, fmt.Errorf("start the embedded Kafka cluster: %w", err)
	}
	return c.ListenAddrs(), "embedded kfake cluster, 3 brokers", c.Close, nil
}

// preparePaymentsTopic creates the payments topic if it is missing and
// returns where the checker starts reading: the current end of every
// partition, so that an external cluster's older events are not counted.
func preparePaymentsTopic(ctx context.Context, brokers []string) (map[string]map[int32]kgo.Offset, error) {
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...), kgo.ClientID("outbox-demo-admin"))
	if err != nil {
		return nil, fmt.Errorf("kafka: %w", err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	bl, err := adm.ListBrokers(ctx)
	if err != nil {
		return nil, fmt.Errorf("kafka at %s: %w", strings.Join(brokers, ","), err)
	}
	resp, err := adm.CreateTopic(ctx, demoPartitions, int16(min(3, len(bl))), nil, Topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return nil, fmt.Errorf("create topic %s: %w", Topic, err)
	}
	for {
		ends, err := adm.ListEndOffsets(ctx, Topic)
		if err == nil {
			err = ends.Error()
		}
		if err == nil && len(ends[Topic]) > 0 {
			return ends.KOffsets(), nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("topic %s: list end offsets: %v", Topic, err)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// task is a goroutine whose end can be waited for.
type task struct {
	done chan struct{}
	err  error
}

func goTask(f func() error) *task {
	t := &task{done: make(chan struct{})}
	go func() {
		defer close(t.done)
		t.err = f()
	}()
	return t
}
