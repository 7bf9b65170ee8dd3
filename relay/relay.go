// Package relay is the outbox-relay daemon: shard ownership through
// PostgreSQL advisory locks, polling and wake-up, batching, the publish loop,
// recovery, retention and metrics. It joins the outbox table (package outbox)
// to Kafka transactions (package txn) under the protocol of DESIGN.md.
package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/standby"
	"github.com/outbox-relay/outbox-relay/tracing"
	"github.com/outbox-relay/outbox-relay/txn"
)

// Failpoint names: places in the publish loop where tests stop the relay
// to prove a crash window is closed.
const (
	// FailBeforeCommit: records and checkpoint produced, EndTxn not sent.
	FailBeforeCommit = "before-commit"
	// FailAfterCommit: the transaction committed, the rows not yet marked.
	FailAfterCommit = "after-commit"
	// FailAfterMark: the rows marked.
	FailAfterMark = "after-mark"
)

// Failpoint is called at each named point with the shard and the batch's
// ids. A non-nil error makes the relay stop there at once, as a crash would:
// no abort, no mark, no clean-up. A failpoint may also block, to hold the
// relay inside a window while a test acts.
type Failpoint func(ctx context.Context, name string, shard int32, ids []int64) error

// Option sets what tests and embedders pass in besides Config.
type Option func(*Relay)

// WithLogger sets the logger (default: slog.Default's handler is NOT used;
// a discarding logger is).
func WithLogger(l *slog.Logger) Option { return func(r *Relay) { r.log = l } }

// WithRegisterer sets where metrics are registered (default: a private
// registry).
func WithRegisterer(reg prometheus.Registerer) Option { return func(r *Relay) { r.reg = reg } }

// WithFailpoint installs a failpoint hook (tests only).
func WithFailpoint(f Failpoint) Option { return func(r *Relay) { r.fail = f } }

// WithKafkaOptions adds franz-go options to every Kafka client (TLS, SASL,
// dialers).
func WithKafkaOptions(opts ...kgo.Opt) Option {
	return func(r *Relay) { r.kopts = append(r.kopts, opts...) }
}

// WithTracerProvider turns tracing on: the relay records one span per
// Kafka transaction (per batch outside exactly-once) on tp's tracer,
// linked to the spans of the rows' writers (their traceparent headers).
// Without it, or with a nil or no-op provider, tracing is off and costs
// nothing. The relay never sets a global provider.
func WithTracerProvider(tp trace.TracerProvider) Option {
	return func(r *Relay) { r.tracer = tracing.Tracer(tp) }
}

// Relay moves committed outbox rows to Kafka exactly once.
type Relay struct {
	cfg   Config
	pool  *pgxpool.Pool
	store *outbox.Store
	log   *slog.Logger
	reg   prometheus.Registerer
	m     *Metrics
	fail  Failpoint
	// serial turns the pipelined publish loop off (WithSerialLoop).
	serial bool
	kopts  []kgo.Opt
	tcfg   txn.Config
	// tracer records the transactions' spans (WithTracerProvider); nil: off.
	tracer trace.Tracer
	// kafka closes after this instance lost or gave up a shard, until a
	// probe of Kafka succeeds: no shard is taken meanwhile (kafkagate.go).
	kafka kafkaGate
	wake  *waker
	// connCfg is the configuration of the relay's dedicated connections
	// (ownership, wake-up): the pool's, prepared by prepareConnConfig.
	connCfg *pgx.ConnConfig
	// beforeConnect is the pool's BeforeConnect (fresh credentials,
	// package pgauth), applied to the dedicated connections too.
	beforeConnect func(context.Context, *pgx.ConnConfig) error
	// instance names this process in <table>_owner, for operators.
	instance string

	mode        txn.Mode
	order       outbox.DeadLetterOrder
	warnings    []string
	incarnation string
	ready       atomic.Bool
	stopping    atomic.Bool

	// halted are the shards stopped for a reason no retry mends (a
	// checkpoint partition holding a record that is not a checkpoint): held,
	// not run, reported by /readyz.
	haltedMu sync.Mutex
	halted   map[int32]error

	// standbys is the OUTBOX_STANDBY_NAMES barrier (nil without it).
	standbys *standby.Barrier
	// history is the database's system identifier and timeline, read at
	// every recovery and written into every checkpoint.
	history atomic.Pointer[outbox.History]
}

// New checks the configuration and prepares a relay on the database pool
// reaches. The relay opens its own connections, configured from pool's, with
// the session settings it needs: durable commits and statement timeouts
// (durableSession), keepalives and a user timeout (prepareConnConfig); pool
// itself is not used. The database must be reached directly or through a
// session-mode pooler. Run starts the relay, once, and closes those
// connections when it returns; after Reshard alone, call Close.
func New(cfg Config, pool *pgxpool.Pool, opts ...Option) (*Relay, error) {
	if err := cfg.Validate(); err != nil {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	r := &Relay{cfg: cfg, log: slog.New(slog.DiscardHandler), reg: prometheus.NewRegistry()}
	for _, o := range opts {
		o(r)
	}
	t := outbox.Table{Schema: cfg.Schema, Name: cfg.Table}
	r.log = r.log.With("table", t.String(), "relay", cfg.RelayName)
	own, err := ownPool(pool, cfg, r.log)
	if err != nil {
		return nil, err
	}
	r.pool = own
	r.order, _ = outbox.ParseDeadLetterOrder(cfg.DeadLetterOrder) // validated
	onPublish, _ := outbox.ParseOnPublish(cfg.OnPublish)          // validated
	r.store = outbox.NewStore(r.pool, t).WithDeadLetterOrder(r.order).WithOnPublish(onPublish)
	r.m = NewMetrics(r.reg)
	r.m.Shards.Set(float64(cfg.Shards))
	settings, warnings, err := cfg.Settings()
	if err != nil {
		return nil, fmt.Errorf("configuration: %w", err)
	}
	r.warnings = warnings
	r.mode = settings.Mode
	// No row larger than the largest record the producer sends is read
	// with its value: it is dead-lettered by its size (publishRows).
	r.store = r.store.WithRecordMaxBytes(int64(recordMaxBytes(settings)))
	r.tcfg = txn.Config{
		Brokers:         cfg.KafkaBrokers,
		RelayName:       cfg.RelayName,
		CheckpointTopic: cfg.CheckpointTopic,
		Settings:        settings,
		Extra:           r.kopts,
		Logger:          r.log,
		CreateTopics:    cfg.CreateTopics,
		Tracer:          r.tracer,
	}
	r.tcfg.CreateTopicPartitions, r.tcfg.CreateTopicReplicationFactor = cfg.createTopic()
	if r.fail != nil {
		r.tcfg.BeforeCommit = func(ctx context.Context, shard int32, ids []int64) error {
			return r.failpoint(ctx, FailBeforeCommit, shard, ids)
		}
	}
	if len(cfg.StandbyNames) > 0 {
		if r.standbys, err = newStandbyBarrier(r.pool, cfg.StandbyNames, r.m); err != nil {
			return nil, fmt.Errorf("configuration: %w", err)
		}
	}
	pc := r.pool.Config()
	r.connCfg, r.beforeConnect = pc.ConnConfig, pc.BeforeConnect
	r.wake = newWaker(r.connCfg, r.beforeConnect, t, r.log)
	host, _ := os.Hostname()
	r.instance = fmt.Sprintf("%s pid %d started %s", host, os.Getpid(), time.Now().UTC().Format(time.RFC3339))
	return r, nil
}

// Close closes the relay's connections. Run closes them itself when it
// returns; call Close after Reshard, or when Run is never called.
func (r *Relay) Close() { r.pool.Close() }

// Ready reports whether the relay has started (schema checked, checkpoint
// topic present, ownership running), is not shutting down, and runs every
// shard it holds.
func (r *Relay) Ready() bool { return r.NotReady() == "" }

// NotReady says why the relay is not ready, or "" when it is.
func (r *Relay) NotReady() string {
	switch {
	case r.stopping.Load():
		return "shutting down"
	case !r.ready.Load():
		return "starting"
	}
	r.haltedMu.Lock()
	defer r.haltedMu.Unlock()
	var why []string
	for s, err := range r.halted {
		why = append(why, fmt.Sprintf("shard %d stopped: %v", s, err))
	}
	slices.Sort(why)
	return strings.Join(why, "\n")
}

// halt records that shard s stopped for good (err), or that it runs again
// (nil).
func (r *Relay) halt(s int32, err error) {
	r.haltedMu.Lock()
	defer r.haltedMu.Unlock()
	if err == nil {
		delete(r.halted, s)
		return
	}
	if r.halted == nil {
		r.halted = map[int32]error{}
	}
	r.halted[s] = err
}

// errCrash marks an error returned by a failpoint: Run returns it at once.
type errCrash struct{ err error }

func (e errCrash) Error() string { return "failpoint: " + e.err.Error() }
func (e errCrash) Unwrap() error { return e.err }

func (r *Relay) failpoint(ctx context.Context, name string, shard int32, ids []int64) error {
	if r.fail == nil {
		return nil
	}
	if err := r.fail(ctx, name, shard, ids); err != nil {
		return errCrash{err}
	}
	return nil
}

// Run relays until ctx is cancelled, then shuts down cleanly: every shard
// finishes the transaction it has open (commit and mark, bounded by
// OUTBOX_SHUTDOWN_TIMEOUT) and returns nil. It returns an error when the
// relay cannot start (schema missing, checkpoint mismatch, Kafka denied) or
// a failpoint stopped it.
func (r *Relay) Run(ctx context.Context) error {
	defer r.pool.Close()
	if err := r.start(ctx); err != nil {
		return err
	}
	r.log.Info("relay started", "delivery", string(r.mode), "shards", r.cfg.Shards, "batch_size", r.cfg.BatchSize,
		"checkpoint_topic", r.cfg.CheckpointTopic, "incarnation", r.incarnation, "on_publish", string(r.store.OnPublish()))
	if r.store.OnPublish() == outbox.Delete && r.cfg.Retention > 0 {
		// Still run: it removes what a relay in mark mode left (before a
		// switch to delete, or alongside), at the cost of one probe of an
		// empty index a minute.
		r.log.Info("OUTBOX_ON_PUBLISH=delete: published rows are deleted as they are published, so OUTBOX_RETENTION has nothing of this relay's to delete; "+
			"it only removes rows marked published by a relay in mark mode", "retention", r.cfg.Retention.String())
	}

	runCtx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var wg sync.WaitGroup
	wg.Go(func() { r.wake.run(runCtx) })
	if r.cfg.Retention > 0 {
		wg.Go(func() { r.retain(runCtx) })
	}
	wg.Go(func() { r.observe(runCtx) })

	r.ready.Store(true)
	err := r.own(runCtx)
	r.stopping.Store(true)
	cancel(err)
	wg.Wait()
	if err != nil && ctx.Err() == nil {
		return err
	}
	r.log.Info("relay stopped")
	return nil
}

// start checks the database side and the checkpoint topic.
func (r *Relay) start(ctx context.Context) error {
	mig, err := migrations.New(r.pool, r.cfg.Schema, r.cfg.Table)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	pending, err := mig.Pending(ctx)
	if err != nil {
		return fmt.Errorf("check schema of %s: %w", r.store.Table(), err)
	}
	if pending > 0 {
		return fmt.Errorf("schema of %s is %d migrations behind: run `outbox-relay migrate up` (or apply migrations/sql with your tool)", r.store.Table(), pending)
	}
	if r.incarnation, err = r.store.Incarnation(ctx); err != nil {
		return err
	}
	// Checked early for a clear error, and again by own each time the
	// member lock is granted: a reshard may run until then.
	if err := r.checkIdentity(ctx); err != nil {
		return err
	}
	if r.standbys != nil {
		if err := r.standbys.CheckAccess(ctx); err != nil {
			return err
		}
	}
	r.warnWithoutShardIndex(ctx)
	for _, w := range r.warnings {
		r.log.Warn(w)
	}
	if r.mode.Transactional() {
		tcfg := r.tcfg
		watch := &saslWatch{}
		tcfg.Extra = append(slices.Clip(tcfg.Extra), kgo.WithHooks(watch))
		if err := txn.EnsureCheckpointTopic(ctx, tcfg, r.cfg.Shards); err != nil {
			if errors.Is(err, txn.ErrClusterMismatch) {
				return err
			}
			if r.cfg.KafkaSASLMech != "" {
				if serr := watch.explain(err, r.cfg); serr != err {
					return serr
				}
			}
			return fmt.Errorf("%w (check OUTBOX_KAFKA_BROKERS=%s and, if the cluster requires them, OUTBOX_KAFKA_TLS and the OUTBOX_KAFKA_SASL_* credentials; SASL mechanism now %q)",
				err, strings.Join(r.cfg.KafkaBrokers, ","), r.cfg.KafkaSASLMech)
		}
	}
	return nil
}

// observe refreshes the backlog gauges of owned shards, and under hold-key
// the gauges of rows held by dead letters.
func (r *Relay) observe(ctx context.Context) {
	t := time.NewTicker(5 * time.Second)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		r.wake.mu.Lock()
		shards := make([]int32, 0, len(r.wake.idle))
		for s := range r.wake.idle {
			shards = append(shards, s)
		}
		r.wake.mu.Unlock()
		for _, s := range shards {
			b, err := r.store.Backlog(ctx, int(s), r.cfg.Shards)
			if err != nil {
				continue
			}
			label := strconv.Itoa(int(s))
			r.m.Backlog.WithLabelValues(label).Set(float64(b.Rows))
			age := 0.0
			if !b.OldestCreate.IsZero() {
				age = time.Since(b.OldestCreate).Seconds()
			}
			r.m.OldestAge.WithLabelValues(label).Set(age)
			if r.order == outbox.HoldKey {
				rows, keys, err := r.store.Held(ctx, int(s), r.cfg.Shards)
				if err != nil {
					continue
				}
				r.m.HeldRows.WithLabelValues(label).Set(float64(rows))
				r.m.HeldKeys.WithLabelValues(label).Set(float64(keys))
			}
		}
	}
}

// retain deletes published rows older than the retention, in small batches.
func (r *Relay) retain(ctx context.Context) {
	t := time.NewTicker(time.Minute)
	defer t.Stop()
	for {
		for {
			n, err := r.store.DeletePublished(ctx, time.Now().Add(-r.cfg.Retention), 5000)
			if err != nil {
				if ctx.Err() == nil {
					r.log.Warn("retention failed", "err", err)
				}
				break
			}
			r.m.Deleted.Add(float64(n))
			if n < 5000 {
				break
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
