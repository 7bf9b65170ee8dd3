// Package inbox applies the events outbox-relay publishes to a consumer's
// PostgreSQL database exactly once.
//
// An [Inbox] consumes its topics as a member of a Kafka consumer group,
// reading with isolation.level=read_committed, and runs the [Handler] for
// each event inside a database transaction (a pgx.Tx). In that same
// transaction it records the event as applied (its topic and event id, the
// outbox-event-id header, or its outbox-id for a record without one, in
// <table>_applied) and the offset of the next record to apply for the
// group, topic and partition (in <table>_offsets). Either all three commit
// or none does. So:
//
//   - A crash anywhere (kill -9, a lost connection, a failed commit) loses
//     nothing and applies nothing twice: the next instance resumes from the
//     offset stored in the database, not from Kafka's group offsets, which
//     the inbox commits only as a courtesy for lag monitoring and never
//     reads.
//   - A record delivered again (an offset below the stored one, or a second
//     record with an event id already applied, as the relay's at-least-once
//     mode or a requeue can produce) is skipped, never applied twice. Two
//     outbox tables feeding one topic, or a restored outbox whose ids start
//     over, give their rows distinct event ids: each is applied.
//   - A handler error rolls back the whole transaction (the handler's writes,
//     the applied row, the offset) and the event is tried again under the
//     retry policy ([Config.MaxAttempts], [Config.RetryBackoff]). An event
//     whose attempts are exhausted, one the handler refuses with [Permanent],
//     and a record without a valid outbox-id header are poison: each is copied
//     to <table>_dead_letter with the error in the same transaction that moves
//     the offset past it, so nothing is lost and the partition goes on.
//   - Several instances share the partitions of a group. An instance that
//     lost a partition cannot commit work on it: every assignment increments
//     the partition's epoch in <table>_offsets, and every applying
//     transaction locks that row and checks the epoch it was given before it
//     commits (see [Inbox.Run] for how the window is closed).
//
// The guarantee covers the effects the handler writes through the
// transaction it is given. A handler that also calls an HTTP API, sends
// mail or writes to another database does that at least once, not exactly
// once.
//
// The tables are created by [Migrator] (NewMigrator(pool, schema,
// table).Up), separate from the relay's migrations.
package inbox

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/tracing"
	"github.com/outbox-relay/outbox-relay/txn"
)

// HeaderOutboxID is the record header that carries the outbox row id, the
// inbox's dedupe key (with the topic) for records without HeaderEventID.
const HeaderOutboxID = txn.HeaderOutboxID

// HeaderEventID is the record header that carries the event's identity (a
// UUID): with the topic, the inbox's dedupe key when present. It is unique
// across outbox tables, databases, restores and fail-overs.
const HeaderEventID = txn.HeaderEventID

// Start says where a group starts on a partition it has never consumed (no
// row in <table>_offsets). Once a partition has a row, the inbox always
// resumes from it.
type Start string

const (
	// StartEarliest starts at the partition's log start offset: every
	// retained record is applied.
	StartEarliest Start = "earliest"
	// StartLatest starts at the partition's last stable offset when the
	// group is first assigned the partition; the offset is stored at once,
	// so a crash right after the assignment skips nothing committed later.
	StartLatest Start = "latest"
)

// Config configures an Inbox. Brokers, Group and Topics are required; the
// rest have defaults.
type Config struct {
	// Brokers are the Kafka seed brokers, host:port.
	Brokers []string
	// Group is the Kafka consumer group. It also keys the stored offsets,
	// so every instance of one service uses the same group.
	Group string
	// Topics are consumed, every partition of each.
	Topics []string

	// Schema and Table name the inbox tables: <Schema>.<Table>_offsets,
	// _applied and _dead_letter. Defaults "public" and "inbox". The
	// dedupe key is (topic, event id), or (topic, outbox-id) for records
	// without an event id, within these tables: two services
	// that apply the same topic to one database each need their own
	// Table.
	Schema string
	Table  string

	// InstanceID makes the instance a static group member (Kafka's
	// group.instance.id, KIP-345): a restarted instance with the same id
	// takes its partitions back without a rebalance, and the instance it
	// replaces is fenced by Kafka as well as by the database. Leave empty
	// for dynamic membership.
	InstanceID string
	// Start is where a group starts on a partition it never consumed;
	// default StartEarliest.
	Start Start

	// BatchSize is the most records applied in one database transaction
	// (default 100). The handler runs once per record; a failing record is
	// retried alone.
	BatchSize int
	// Concurrency is how many partitions are applied at once, each on its
	// own connection (default 4). Records of one partition are always
	// applied one after the other, in offset order.
	Concurrency int
	// MaxAttempts is how many times the handler is tried on one event
	// before it is dead-lettered (default 5; 1 dead-letters at the first
	// error).
	MaxAttempts int
	// RetryBackoff is the wait before the second attempt; it doubles for
	// each further attempt up to MaxRetryBackoff (defaults 100ms and 5s).
	// Database failures outside the handler are retried with the same
	// backoff for as long as they last, and never dead-letter an event.
	RetryBackoff    time.Duration
	MaxRetryBackoff time.Duration
	// CommitInterval is how often the applied offsets are also committed
	// to Kafka's group offsets, for lag monitoring only (default 5s).
	CommitInterval time.Duration
	// ShutdownTimeout bounds how long Run, once its context ends, waits
	// for the transactions in flight to finish (default 10s); after it
	// they are cancelled, which rolls them back.
	ShutdownTimeout time.Duration
	// KafkaOptions are added to the consumer's franz-go options (TLS,
	// SASL, client id, session and heartbeat timeouts). Options that
	// would change the guarantee (isolation level, offsets, commits) are
	// set by the inbox after these, and win.
	KafkaOptions []kgo.Opt
}

func (c *Config) setDefaults() {
	if c.Schema == "" {
		c.Schema = "public"
	}
	if c.Table == "" {
		c.Table = "inbox"
	}
	if c.Start == "" {
		c.Start = StartEarliest
	}
	if c.BatchSize == 0 {
		c.BatchSize = 100
	}
	if c.Concurrency == 0 {
		c.Concurrency = 4
	}
	if c.MaxAttempts == 0 {
		c.MaxAttempts = 5
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = 100 * time.Millisecond
	}
	if c.MaxRetryBackoff == 0 {
		c.MaxRetryBackoff = 5 * time.Second
	}
	if c.CommitInterval == 0 {
		c.CommitInterval = 5 * time.Second
	}
	if c.ShutdownTimeout == 0 {
		c.ShutdownTimeout = 10 * time.Second
	}
}

// validate reports every problem of c at once.
func (c *Config) validate() error {
	var errs []error
	if len(c.Brokers) == 0 {
		errs = append(errs, errors.New("inbox: Brokers is empty: give the Kafka seed brokers"))
	}
	if c.Group == "" {
		errs = append(errs, errors.New("inbox: Group is empty: every instance of a service uses the same consumer group"))
	}
	if len(c.Topics) == 0 {
		errs = append(errs, errors.New("inbox: Topics is empty"))
	}
	if err := checkNames(c.Schema, c.Table); err != nil {
		errs = append(errs, fmt.Errorf("inbox: %w", err))
	}
	if c.Start != StartEarliest && c.Start != StartLatest {
		errs = append(errs, fmt.Errorf("inbox: Start %q: want %q or %q", c.Start, StartEarliest, StartLatest))
	}
	if c.BatchSize < 1 || c.BatchSize > 10000 {
		errs = append(errs, fmt.Errorf("inbox: BatchSize %d: want 1 to 10000", c.BatchSize))
	}
	if c.Concurrency < 1 || c.Concurrency > 256 {
		errs = append(errs, fmt.Errorf("inbox: Concurrency %d: want 1 to 256", c.Concurrency))
	}
	if c.MaxAttempts < 1 {
		errs = append(errs, fmt.Errorf("inbox: MaxAttempts %d: want at least 1", c.MaxAttempts))
	}
	if c.RetryBackoff < 0 || c.MaxRetryBackoff < c.RetryBackoff {
		errs = append(errs, fmt.Errorf("inbox: RetryBackoff %v, MaxRetryBackoff %v: want 0 <= RetryBackoff <= MaxRetryBackoff", c.RetryBackoff, c.MaxRetryBackoff))
	}
	if c.CommitInterval < 0 || c.ShutdownTimeout < 0 {
		errs = append(errs, errors.New("inbox: CommitInterval and ShutdownTimeout must not be negative"))
	}
	return errors.Join(errs...)
}

// Event is one record to apply.
type Event struct {
	// OutboxID is the outbox row id from the record's outbox-id header:
	// with Topic, the dedupe key of a record without an event id.
	OutboxID int64
	// EventID is the event's identity from the record's outbox-event-id
	// header (a lower-case UUID), "" for a record from before the relay's
	// migration 7: with Topic, the dedupe key when set.
	EventID   string
	Topic     string
	Partition int32
	Offset    int64
	Key       []byte
	Value     []byte
	Headers   []kgo.RecordHeader
	Timestamp time.Time
	// Attempt is 1 the first time the handler sees the event, then 2, 3,
	// ... after errors.
	Attempt int
}

// Header returns the value of the first header named key, and whether
// there is one.
func (e *Event) Header(key string) (string, bool) {
	for _, h := range e.Headers {
		if h.Key == key {
			return string(h.Value), true
		}
	}
	return "", false
}

// Handler applies one event through tx, the transaction that also records
// it as applied and moves the offset. It must not commit or roll back tx,
// and must make every effect that has to happen exactly once through tx.
// A nil error commits the event with the rest of its batch; an error rolls
// the batch back and the event is retried (see Config.MaxAttempts), unless
// it is wrapped with [Permanent], which dead-letters the event at once.
// A handler that panics is treated as one that returned an error. A
// database error that says nothing about the event (deadlock detected,
// serialization failure, lock timeout) rolls back and retries the batch
// without counting an attempt.
type Handler func(ctx context.Context, tx pgx.Tx, ev *Event) error

type permanent struct{ err error }

func (p permanent) Error() string { return "permanent: " + p.err.Error() }
func (p permanent) Unwrap() error { return p.err }

// Permanent marks a handler error as one no retry mends (an event the
// handler cannot decode, a transfer to an account that does not exist):
// the event goes to the dead-letter table without further attempts.
func Permanent(err error) error {
	if err == nil {
		return nil
	}
	return permanent{err}
}

// IsPermanent reports whether err was marked with Permanent.
func IsPermanent(err error) bool {
	var p permanent
	return errors.As(err, &p)
}

var (
	// ErrFenced is what an applying transaction finds when the partition
	// was assigned again (to another instance, or anew to this one) after
	// the records it holds were fetched: it commits nothing, and the
	// instance drops the records; the current owner applies them.
	ErrFenced = errors.New("inbox: partition fenced: it was assigned again after these records were fetched")
	// ErrRecordsDeleted: the stored offset of a partition is below the log
	// start, so Kafka deleted records (retention, DeleteRecords) before
	// the group applied them. Run stops rather than skip them.
	ErrRecordsDeleted = errors.New("inbox: records deleted before they were applied")
	// ErrOffsetBeyondEnd: the stored offset of a partition is past the
	// end of its log: the topic was deleted and created again, or the
	// database belongs to another cluster. Run stops rather than skip the
	// new records.
	ErrOffsetBeyondEnd = errors.New("inbox: stored offset is beyond the end of the partition")
	// ErrInstanceFenced: Kafka fenced this static member because another
	// instance joined with the same Config.InstanceID.
	ErrInstanceFenced = errors.New("inbox: another instance joined the group with this InstanceID")
)

// Failpoint names: places in the apply loop where tests and the demo's
// -chaos stop or hold an instance.
const (
	// FailBeforeApply: a batch of records is about to begin its
	// transaction.
	FailBeforeApply = "before-apply"
	// FailBeforeCommit: the handlers ran and the offset moved, inside the
	// open transaction.
	FailBeforeCommit = "before-commit"
	// FailAfterCommit: the transaction committed; nothing else happened
	// (no Kafka commit, no local bookkeeping).
	FailAfterCommit = "after-commit"
)

// Failpoint is called at each named point with the partition and the
// batch's offsets. A non-nil error stops Run at once with that error, as a
// crash would: the open transaction is abandoned (rolled back when its
// connection is released), nothing is committed to Kafka. A failpoint may
// also block, to hold the instance inside a window while a test acts.
type Failpoint func(ctx context.Context, name, topic string, partition int32, offsets []int64) error

// Option sets what tests and embedders pass in besides Config.
type Option func(*Inbox)

// WithLogger sets the logger (default: discard).
func WithLogger(l *slog.Logger) Option { return func(i *Inbox) { i.log = l } }

// WithRegisterer sets where the metrics are registered (default: a private
// registry).
func WithRegisterer(reg prometheus.Registerer) Option { return func(i *Inbox) { i.reg = reg } }

// WithFailpoint installs a failpoint hook (tests and the demo only).
func WithFailpoint(f Failpoint) Option { return func(i *Inbox) { i.fail = f } }

// WithTracerProvider turns tracing on: the inbox starts one consumer span
// per handler call on tp's tracer, a child of the span in the record's
// traceparent header (the writer's, which the relay keeps), or a new root
// when the record has none, and passes it to the handler in ctx. Without
// it, or with a nil or no-op provider, tracing is off and costs nothing.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(i *Inbox) { i.tracer = tracing.Tracer(tp) }
}

// DB is what the inbox needs of PostgreSQL: transactions, several at once
// when Config.Concurrency is above 1. *pgxpool.Pool fits.
type DB interface {
	Begin(ctx context.Context) (pgx.Tx, error)
}

// Stats are counts since New, for tests, the demo and logs.
type Stats struct {
	Applied      int64 // events the handler applied (committed)
	Redelivered  int64 // records skipped: offset below the stored one
	Duplicates   int64 // records skipped: outbox-id already applied
	DeadLettered int64 // events moved to the dead-letter table
	HandlerErrs  int64 // handler errors (each rolled back a transaction)
	Fenced       int64 // transactions refused by the fence
	Assignments  int64 // partitions assigned (each bumped an epoch)
}

// Inbox applies the records of Config.Topics to the database exactly once.
// Create it with New; Run it once.
type Inbox struct {
	cfg    Config
	db     DB
	handle Handler
	log    *slog.Logger
	reg    prometheus.Registerer
	m      *metrics
	fail   Failpoint
	owner  string
	t      tables
	// tracer starts the handler's spans (WithTracerProvider); nil: off.
	tracer trace.Tracer

	started atomic.Bool
	client  atomic.Pointer[kgo.Client]
	ready   chan struct{} // closed once client is set

	mu    sync.Mutex
	owned map[partitionKey]int64 // epoch of each partition this instance holds

	fatalMu sync.Mutex
	fatal   error
	stopRun context.CancelFunc

	applied, redelivered, duplicates, deadLettered, handlerErrs, fenced, assignments atomic.Int64
}

type partitionKey struct {
	topic     string
	partition int32
}

// tables are the quoted names of the inbox tables.
type tables struct {
	offsets, applied, deadLetter string
}

// New checks cfg and prepares an inbox on db that applies records with
// handle. The tables must exist (Migrator.Up); Run checks.
func New(cfg Config, db DB, handle Handler, opts ...Option) (*Inbox, error) {
	cfg.setDefaults()
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if db == nil || handle == nil {
		return nil, errors.New("inbox: New needs a database and a handler")
	}
	i := &Inbox{cfg: cfg, db: db, handle: handle, log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry(),
		ready: make(chan struct{}), owned: map[partitionKey]int64{}}
	for _, o := range opts {
		o(i)
	}
	host, _ := os.Hostname()
	i.owner = fmt.Sprintf("%s/%d/%s", host, os.Getpid(), randomHex(4))
	if cfg.InstanceID != "" {
		i.owner = cfg.InstanceID + "@" + i.owner
	}
	i.log = i.log.With("group", cfg.Group, "owner", i.owner)
	q := func(suffix string) string { return quoteIdent(cfg.Schema) + "." + quoteIdent(cfg.Table+suffix) }
	i.t = tables{offsets: q("_offsets"), applied: q("_applied"), deadLetter: q("_dead_letter")}
	i.m = newMetrics(i.reg)
	return i, nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// Stats returns the counts so far.
func (i *Inbox) Stats() Stats {
	return Stats{Applied: i.applied.Load(), Redelivered: i.redelivered.Load(), Duplicates: i.duplicates.Load(),
		DeadLettered: i.deadLettered.Load(), HandlerErrs: i.handlerErrs.Load(), Fenced: i.fenced.Load(),
		Assignments: i.assignments.Load()}
}

// Owner is what this instance writes into <table>_offsets.owner:
// [InstanceID@]host/pid/random, different for every New.
func (i *Inbox) Owner() string { return i.owner }

// Run joins the consumer group and applies records until ctx ends (it
// returns nil after finishing the transactions in flight, within
// Config.ShutdownTimeout) or a fatal error stops it: the tables missing,
// ErrRecordsDeleted, ErrOffsetBeyondEnd, ErrInstanceFenced, a failpoint's
// error. Run may be called once.
//
// How a partition changes hands without loss or double application:
//
//  1. When Kafka assigns partitions to this instance, before any fetch, one
//     database transaction increments each partition's epoch in
//     <table>_offsets (creating the row at the Config.Start offset if
//     there is none), records this instance as owner and reads the stored
//     next_offset under the row lock. Fetching starts there, whatever
//     Kafka's group offsets say.
//  2. Every applying transaction first locks that row (SELECT ... FOR
//     UPDATE) and compares its epoch with the epoch this instance got in
//     step 1 for the records it holds; on a mismatch it rolls back
//     (ErrFenced) and the records are dropped.
//  3. The row lock orders the two. If the old owner's transaction locked
//     the row first, the new owner's step 1 waits for its commit and reads
//     the next_offset that commit wrote: the new owner starts after the
//     old owner's last event. If step 1 came first, the old owner's
//     transaction finds the new epoch and commits nothing. There is no
//     order in which both apply an event, or neither does.
//
// Records below the stored next_offset are skipped (a redelivery), and so
// is a record whose (topic, outbox-id) is already in <table>_applied.
//
// Step 1 runs in franz-go's AdjustFetchOffsetsFn, whose context ends when
// the group session does, and franz-go waits for it to return before it
// revokes: an instance's assignment transaction has committed (or rolled
// back) before Kafka can give the partition to another member. One narrow
// case is left to liveness, not safety: a process frozen inside step 1
// whose transaction commits after it thawed, once the partition already
// went to another member. Its epoch then fences the rightful owner, which
// drops the partition's records until the next rebalance (the thawed
// instance's next heartbeat fails and causes one): a stall, never a loss
// or a second application.
func (i *Inbox) Run(ctx context.Context) error {
	if !i.started.CompareAndSwap(false, true) {
		return errors.New("inbox: Run called twice")
	}
	mig, err := NewMigrator(i.db, i.cfg.Schema, i.cfg.Table)
	if err != nil {
		return err
	}
	if n, err := mig.Pending(ctx); err != nil {
		return fmt.Errorf("inbox: check the schema: %w", err)
	} else if n > 0 {
		return fmt.Errorf("inbox: %d migrations of %s.%s are pending: apply them first (inbox.NewMigrator(pool, %q, %q).Up(ctx))",
			n, i.cfg.Schema, i.cfg.Table, i.cfg.Schema, i.cfg.Table)
	}

	runCtx, stop := context.WithCancel(ctx)
	defer stop()
	i.fatalMu.Lock()
	i.stopRun = stop
	i.fatalMu.Unlock()

	opts := []kgo.Opt{kgo.SeedBrokers(i.cfg.Brokers...), kgo.ClientID("outbox-inbox")}
	opts = append(opts, i.cfg.KafkaOptions...)
	opts = append(opts,
		kgo.ConsumerGroup(i.cfg.Group),
		kgo.ConsumeTopics(i.cfg.Topics...),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		// Never reset an offset on OFFSET_OUT_OF_RANGE: records deleted
		// before they were applied stop Run (ErrRecordsDeleted).
		kgo.ConsumeResetOffset(kgo.NoResetOffset()),
		kgo.AdjustFetchOffsetsFn(i.assigned),
		kgo.OnPartitionsRevoked(i.revoked),
		kgo.OnPartitionsLost(i.lost),
		// Kafka's group offsets are a courtesy for lag monitoring:
		// committed from marks after each database commit, never read.
		kgo.AutoCommitMarks(),
		kgo.AutoCommitInterval(i.cfg.CommitInterval),
	)
	if i.cfg.InstanceID != "" {
		opts = append(opts, kgo.InstanceID(i.cfg.InstanceID))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return fmt.Errorf("inbox: kafka client: %w", err)
	}
	i.client.Store(cl)
	close(i.ready)
	i.log.Info("inbox started", "topics", i.cfg.Topics, "tables", i.cfg.Schema+"."+i.cfg.Table+"_*")

	// Transactions in flight finish after ctx ends, up to the shutdown
	// timeout; then they are cancelled (and roll back).
	work, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()
	go func() {
		select {
		case <-runCtx.Done():
		case <-work.Done():
			return
		}
		t := time.NewTimer(i.cfg.ShutdownTimeout)
		defer t.Stop()
		select {
		case <-t.C:
			cancelWork()
		case <-work.Done():
		}
	}()

	err = i.poll(runCtx, work, cl)
	var crash crashError
	if errors.As(err, &crash) {
		// A failpoint: stop as a killed process would, without the
		// courtesy commit. Close still has to release the sockets.
		cl.Close()
		return crash.err
	}
	if ferr := i.fatalErr(); ferr != nil {
		err = ferr
	}
	cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	if cerr := cl.CommitMarkedOffsets(cctx); cerr != nil && err == nil {
		i.log.Warn("inbox: courtesy commit of group offsets failed (harmless: they are never read)", "err", cerr)
	}
	cancel()
	cl.Close()
	i.log.Info("inbox stopped", "err", err)
	return err
}

// crashError carries a failpoint's error out of the workers.
type crashError struct{ err error }

func (c crashError) Error() string { return c.err.Error() }

// setFatal records the first fatal error and stops Run.
func (i *Inbox) setFatal(err error) {
	i.fatalMu.Lock()
	defer i.fatalMu.Unlock()
	if i.fatal == nil {
		i.fatal = err
		i.log.Error("inbox stopping", "err", err)
	}
	if i.stopRun != nil {
		i.stopRun()
	}
}

func (i *Inbox) fatalErr() error {
	i.fatalMu.Lock()
	defer i.fatalMu.Unlock()
	return i.fatal
}

// poll fetches and applies until ctx ends or a fatal error; it returns a
// crashError when a failpoint stopped a worker.
func (i *Inbox) poll(ctx, work context.Context, cl *kgo.Client) error {
	for {
		if ctx.Err() != nil {
			return nil
		}
		fs := cl.PollRecords(ctx, 10*i.cfg.BatchSize*i.cfg.Concurrency)
		if fs.IsClientClosed() {
			return nil
		}
		for _, fe := range fs.Errors() {
			if err := i.fetchError(ctx, fe); err != nil {
				i.setFatal(err)
				return nil
			}
		}
		type job struct {
			key   partitionKey
			epoch int64
			recs  []*kgo.Record
		}
		var jobs []job
		fs.EachPartition(func(p kgo.FetchTopicPartition) {
			if len(p.Records) == 0 {
				return
			}
			key := partitionKey{p.Topic, p.Partition}
			// The epoch is taken now, with the records: records fetched
			// before a new assignment carry the old epoch and are fenced.
			epoch, ok := i.epochOf(key)
			if !ok {
				i.log.Debug("inbox: dropping records of a partition no longer held", "topic", p.Topic, "partition", p.Partition, "records", len(p.Records))
				return
			}
			jobs = append(jobs, job{key, epoch, p.Records})
		})
		if len(jobs) == 0 {
			continue
		}
		var (
			wg    sync.WaitGroup
			sem   = make(chan struct{}, i.cfg.Concurrency)
			mu    sync.Mutex
			crash error
		)
		for _, j := range jobs {
			wg.Add(1)
			sem <- struct{}{}
			go func() {
				defer wg.Done()
				defer func() { <-sem }()
				err := i.applyPartition(ctx, work, j.key, j.epoch, j.recs)
				var c crashError
				if errors.As(err, &c) {
					mu.Lock()
					crash = c
					mu.Unlock()
				}
			}()
		}
		wg.Wait()
		if crash != nil {
			return crash
		}
	}
}

// fetchError decides what a fetch error means: nil to go on, or the error
// that stops Run.
func (i *Inbox) fetchError(ctx context.Context, fe kgo.FetchError) error {
	switch {
	case ctx.Err() != nil, errors.Is(fe.Err, context.Canceled), errors.Is(fe.Err, kgo.ErrClientClosed):
		return nil
	case errors.Is(fe.Err, kerr.OffsetOutOfRange):
		return fmt.Errorf("%w: %s partition %d: the broker answered OFFSET_OUT_OF_RANGE while consuming (retention deleted records the group had not applied yet): %v",
			ErrRecordsDeleted, fe.Topic, fe.Partition, fe.Err)
	case errors.Is(fe.Err, kerr.FencedInstanceID):
		return fmt.Errorf("%w %q: %v", ErrInstanceFenced, i.cfg.InstanceID, fe.Err)
	}
	i.m.fetchErrors.Inc()
	i.log.Warn("inbox: fetch failed, retrying", "topic", fe.Topic, "partition", fe.Partition, "err", fe.Err)
	return nil
}

func (i *Inbox) epochOf(key partitionKey) (int64, bool) {
	i.mu.Lock()
	defer i.mu.Unlock()
	e, ok := i.owned[key]
	return e, ok
}

// release forgets key if this instance still holds it at epoch (-1: at any
// epoch).
func (i *Inbox) release(key partitionKey, epoch int64) {
	i.mu.Lock()
	defer i.mu.Unlock()
	if e, ok := i.owned[key]; ok && (epoch < 0 || e == epoch) {
		delete(i.owned, key)
		i.m.owned.Dec()
	}
}

// assigned is the AdjustFetchOffsetsFn: step 1 of the hand-over (see Run).
// It runs for newly assigned partitions, before their first fetch, and
// replaces the offsets Kafka's group has with the ones in the database.
func (i *Inbox) assigned(ctx context.Context, offsets map[string]map[int32]kgo.Offset) (map[string]map[int32]kgo.Offset, error) {
	select {
	case <-i.ready:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	cl := i.client.Load()
	var keys []partitionKey
	topics := make([]string, 0, len(offsets))
	for topic, ps := range offsets {
		topics = append(topics, topic)
		for p := range ps {
			keys = append(keys, partitionKey{topic, p})
		}
	}
	if len(keys) == 0 {
		return offsets, nil
	}
	slices.SortFunc(keys, func(a, b partitionKey) int {
		if a.topic != b.topic {
			if a.topic < b.topic {
				return -1
			}
			return 1
		}
		return int(a.partition - b.partition)
	})
	bounds, err := i.logBounds(ctx, kadm.NewClient(cl), topics)
	if err == nil {
		for _, k := range keys {
			if b, ok := bounds[k]; !ok || b.start < 0 || b.end < 0 || b.stable < 0 {
				err = fmt.Errorf("no log offsets listed for %s partition %d", k.topic, k.partition)
				break
			}
		}
	}
	if err != nil {
		i.log.Warn("inbox: listing offsets for new partitions failed; Kafka will assign them again", "err", err)
		return nil, err
	}
	next, err := i.takePartitions(ctx, keys, bounds)
	if err != nil {
		i.log.Warn("inbox: recording the assignment failed; Kafka will assign the partitions again", "err", err)
		return nil, err
	}
	out := make(map[string]map[int32]kgo.Offset, len(offsets))
	var problems []error
	for _, k := range keys {
		taken := next[k]
		b := bounds[k]
		switch {
		case taken.next < b.start:
			problems = append(problems, fmt.Errorf("%w: %s partition %d: the group %q applied up to offset %d, the log now starts at %d: records %d to %d were deleted (retention?) before they were applied. "+
				"Restore them from elsewhere, or accept the loss with: UPDATE %s SET next_offset = %d WHERE consumer_group = '%s' AND topic = '%s' AND partition = %d",
				ErrRecordsDeleted, k.topic, k.partition, i.cfg.Group, taken.next, b.start, taken.next, b.start-1, i.t.offsets, b.start, i.cfg.Group, k.topic, k.partition))
			continue
		case taken.next > b.end:
			problems = append(problems, fmt.Errorf("%w: %s partition %d: stored next offset %d, the log ends at %d: the topic was probably deleted and created again; "+
				"check, then move the group back with: UPDATE %s SET next_offset = 0 WHERE consumer_group = '%s' AND topic = '%s' AND partition = %d",
				ErrOffsetBeyondEnd, k.topic, k.partition, taken.next, b.end, i.t.offsets, i.cfg.Group, k.topic, k.partition))
			continue
		}
		if out[k.topic] == nil {
			out[k.topic] = map[int32]kgo.Offset{}
		}
		out[k.topic][k.partition] = kgo.NewOffset().At(taken.next)
		i.mu.Lock()
		if _, had := i.owned[k]; !had {
			i.m.owned.Inc()
		}
		i.owned[k] = taken.epoch
		i.mu.Unlock()
		i.assignments.Add(1)
		i.m.assignments.Inc()
		i.log.Info("inbox: partition assigned", "topic", k.topic, "partition", k.partition, "epoch", taken.epoch, "next_offset", taken.next,
			"group_offset", offsets[k.topic][k.partition].EpochOffset().Offset)
	}
	if len(problems) > 0 {
		err := errors.Join(problems...)
		i.setFatal(err)
		return nil, err
	}
	return out, nil
}

type bound struct{ start, end, stable int64 }

// logBounds lists the log start, high watermark and last stable offset of
// every partition of topics.
func (i *Inbox) logBounds(ctx context.Context, adm *kadm.Client, topics []string) (map[partitionKey]bound, error) {
	starts, err := adm.ListStartOffsets(ctx, topics...)
	if err == nil {
		err = starts.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("list start offsets: %w", err)
	}
	ends, err := adm.ListEndOffsets(ctx, topics...)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("list end offsets: %w", err)
	}
	stables, err := adm.ListCommittedOffsets(ctx, topics...)
	if err == nil {
		err = stables.Error()
	}
	if err != nil {
		return nil, fmt.Errorf("list last stable offsets: %w", err)
	}
	out := map[partitionKey]bound{}
	starts.Each(func(o kadm.ListedOffset) {
		k := partitionKey{o.Topic, o.Partition}
		e, ok1 := ends.Lookup(o.Topic, o.Partition)
		st, ok2 := stables.Lookup(o.Topic, o.Partition)
		if ok1 && ok2 {
			out[k] = bound{start: o.Offset, end: e.Offset, stable: st.Offset}
		}
	})
	return out, nil
}

type taken struct{ next, epoch int64 }

// takePartitions is the database half of step 1: one transaction that
// creates or bumps each partition's row and returns its next offset and
// new epoch, read under the row lock.
func (i *Inbox) takePartitions(ctx context.Context, keys []partitionKey, bounds map[partitionKey]bound) (map[partitionKey]taken, error) {
	topics := make([]string, len(keys))
	parts := make([]int32, len(keys))
	initial := make([]int64, len(keys))
	for n, k := range keys {
		topics[n], parts[n] = k.topic, k.partition
		b := bounds[k]
		initial[n] = b.start
		if i.cfg.Start == StartLatest {
			initial[n] = b.stable
		}
	}
	out := map[partitionKey]taken{}
	err := pgx.BeginFunc(ctx, i.db, func(tx pgx.Tx) error {
		rows, err := tx.Query(ctx, `INSERT INTO `+i.t.offsets+` AS o (consumer_group, topic, partition, next_offset, epoch, owner)
SELECT $1, t, p, n, 1, $5 FROM unnest($2::text[], $3::int[], $4::bigint[]) WITH ORDINALITY AS u(t, p, n, i) ORDER BY i
ON CONFLICT (consumer_group, topic, partition) DO UPDATE
SET epoch = o.epoch + 1, owner = EXCLUDED.owner, assigned_at = now()
RETURNING topic, partition, next_offset, epoch`, i.cfg.Group, topics, parts, initial, i.owner)
		if err != nil {
			return err
		}
		defer rows.Close()
		for rows.Next() {
			var k partitionKey
			var t taken
			if err := rows.Scan(&k.topic, &k.partition, &t.next, &t.epoch); err != nil {
				return err
			}
			out[k] = t
		}
		return rows.Err()
	})
	if err != nil {
		return nil, fmt.Errorf("record the assignment in %s: %w", i.t.offsets, err)
	}
	return out, nil
}

// revoked forgets partitions Kafka took away (records already fetched for
// them are dropped; a transaction in flight is settled by the fence), and
// commits the courtesy group offsets.
func (i *Inbox) revoked(ctx context.Context, cl *kgo.Client, revoked map[string][]int32) {
	i.forget(revoked, "revoked")
	if len(revoked) == 0 {
		return
	}
	cctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := cl.CommitMarkedOffsets(cctx); err != nil {
		i.log.Debug("inbox: courtesy commit on revoke failed (harmless)", "err", err)
	}
}

// lost is revoked without the commit: the group session is gone.
func (i *Inbox) lost(_ context.Context, _ *kgo.Client, lost map[string][]int32) {
	i.forget(lost, "lost")
}

func (i *Inbox) forget(m map[string][]int32, how string) {
	for topic, ps := range m {
		for _, p := range ps {
			i.release(partitionKey{topic, p}, -1)
		}
		if len(ps) > 0 {
			i.log.Info("inbox: partitions "+how, "topic", topic, "partitions", ps)
		}
	}
}

// Seed records where the group starts on partitions it has never consumed:
// next[p] is the offset of the first record to apply on partition p of
// topic. Partitions that already have a row are left alone, so Seed is
// safe to call on every start (the demo seeds the end offsets it saw before
// writing, so an external cluster's older events are not applied).
func (i *Inbox) Seed(ctx context.Context, topic string, next map[int32]int64) error {
	parts := make([]int32, 0, len(next))
	offs := make([]int64, 0, len(next))
	for p, o := range next {
		parts = append(parts, p)
		offs = append(offs, o)
	}
	tx, err := i.db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("inbox: seed offsets: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	if _, err := tx.Exec(ctx, `INSERT INTO `+i.t.offsets+` (consumer_group, topic, partition, next_offset, epoch, owner)
SELECT $1, $2, p, n, 0, 'seed' FROM unnest($3::int[], $4::bigint[]) AS u(p, n)
ON CONFLICT (consumer_group, topic, partition) DO NOTHING`, i.cfg.Group, topic, parts, offs); err != nil {
		return fmt.Errorf("inbox: seed offsets of %s: %w", topic, err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("inbox: seed offsets of %s: %w", topic, err)
	}
	return nil
}
