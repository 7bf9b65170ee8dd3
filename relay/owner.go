package relay

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// ErrSessionNeeded: the relay's database connection does not keep a session
// of its own (a connection pooler in transaction or statement mode), so its
// session advisory locks and LISTEN cannot work.
var ErrSessionNeeded = errors.New("the relay needs a direct or session-pooled PostgreSQL connection")

// lease is a shard worker's hold on its shard: the lease its statements
// carry (the fencing token), and the deadline of the step the worker is in,
// which decides whether the ownership loop renews the lease. A worker that
// stays in a step past the step's own bound (a transaction budget, a
// statement's, a wait) makes no progress: its lease expires and a standby
// takes the shard over (I6).
type lease struct {
	outbox.Lease
	base     time.Time
	slack    time.Duration
	deadline atomic.Int64 // of the current step, in nanoseconds after base
	// failures counts the worker's steps that failed in a row (batches,
	// recoveries, mark retries): outbox_relay_shard_consecutive_failures.
	failures atomic.Int64
	// pipe is the pipelined publish loop's state while it runs (nil
	// otherwise); the shard's worker goroutine alone uses it.
	pipe *pipeline
}

func newLease(l outbox.Lease, slack time.Duration) *lease {
	return &lease{Lease: l, base: time.Now(), slack: slack}
}

// step records that the worker begins a step that ends within d.
func (l *lease) step(d time.Duration) { l.deadline.Store(int64(time.Since(l.base) + d + l.slack)) }

// live reports whether the worker's current step is within its bound (the
// local monotonic clock of this process only; lease expiry is judged by the
// database clock).
func (l *lease) live() bool { return int64(time.Since(l.base)) < l.deadline.Load() }

// dbBudget bounds one database step of a worker (a read, a mark, a move to
// the dead-letter table) for the lease: half of OUTBOX_OWNER_LEASE.
func (r *Relay) dbBudget() time.Duration { return r.cfg.ownerLease() / 2 }

// recoveryBudget bounds a shard's recovery: InitProducerID, the checkpoint
// read, the mark.
func (r *Relay) recoveryBudget() time.Duration { return r.txnBudget() + r.dbBudget() }

// worker is one shard's goroutine, as the ownership loop sees it.
type worker struct {
	lease    *lease
	cancel   context.CancelFunc
	done     chan struct{}
	err      error // set before done is closed
	stopping bool  // cancelled: finishing its open batch, or abandoned when it makes no progress
	stalled  bool  // past its step's bound (logged once)
}

// owner is the state of the ownership loop.
type owner struct {
	r       *Relay
	key     string // the table, for lock keys
	conn    *pgx.Conn
	workers map[int32]*worker
	// held are shards whose worker stopped for good (haltsShard): their
	// locks stay taken and their leases renewed, so that no other instance
	// loops on them, until this session ends; /readyz reports them.
	held   map[int32]outbox.Lease
	ended  chan struct{}
	offset int
	// takeoverFailing: the last attempt to end a stale owner's session
	// failed (logged once).
	takeoverFailing bool
}

// own holds shard ownership until ctx ends, or returns the error that must
// stop the relay.
//
// A dedicated connection holds a shared "member" lock, which lets instances
// count each other and each own a fair share (ceil(shards / members)), and
// one advisory lock per owned shard. Taking a shard also takes its lease in
// <table>_owner (a new fencing token) before its recovery runs. On every
// tick the loop renews the leases of the shards whose workers make progress,
// and ends the session of any other instance that holds a shard whose lease
// expired (frozen, partitioned, wedged): its locks go with it, this instance
// takes the shard, and the new owner's InitProducerID fences the old one in
// Kafka before a row is read, while the token fences it in PostgreSQL.
//
// The identity of the table (shard count, relay name, checkpoint topic) is
// checked each time the member lock is granted: `reshard` holds it
// exclusively, so no relay can join during a reshard and run with the old
// values.
func (r *Relay) own(ctx context.Context) error {
	o := &owner{r: r, key: r.store.Table().String(), workers: map[int32]*worker{}, held: map[int32]outbox.Lease{},
		ended: make(chan struct{}, 1), offset: rand.IntN(r.cfg.Shards)}
	defer o.closeConn()
	return o.run(ctx)
}

func (o *owner) run(ctx context.Context) error {
	r := o.r
	tick := time.NewTicker(r.cfg.RebalanceInterval)
	defer tick.Stop()
	var fatal error
	shutting := false
	stop := func(err error) {
		if fatal == nil {
			fatal = err
		}
		if !shutting {
			shutting = true
			o.stopAll()
		}
	}
	for {
		if ctx.Err() != nil && !shutting {
			stop(nil)
		}
		// A new session only once every worker of the old one is gone, so
		// that no shard has two workers here.
		if o.conn == nil && !shutting && len(o.workers) == 0 {
			if err := o.connect(ctx); err != nil {
				switch {
				case ctx.Err() != nil:
					stop(nil)
				case ownershipFatal(err):
					return err
				default:
					r.log.Warn("ownership connection failed, retrying", "err", err)
				}
			}
		}
		if o.conn != nil {
			if err := o.tick(ctx, shutting); err != nil {
				if ownershipFatal(err) {
					stop(err)
				} else {
					o.lost(err)
				}
			}
		}
		if err := o.reap(); err != nil {
			stop(err)
		}
		if shutting && len(o.workers) == 0 {
			return fatal
		}
		done := ctx.Done()
		if shutting {
			done = nil
		}
		select {
		case <-done:
		case <-o.ended:
		case <-tick.C:
		}
	}
}

// ownershipFatal: errors that stop the relay rather than being retried.
func ownershipFatal(err error) bool {
	return errors.Is(err, ErrShardsChanged) || errors.Is(err, ErrRelayNameChanged) ||
		errors.Is(err, ErrCheckpointTopicChanged) || errors.Is(err, ErrDeliveryChanged) || errors.Is(err, ErrSessionNeeded)
}

const memberLocksSQL = `FROM pg_locks WHERE locktype = 'advisory' AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND classid::bigint = $1 AND objid::bigint = (hashtext($2)::bigint & 4294967295) AND objsubid = 2`

// connect opens the ownership session: the member lock (waiting while a
// reshard holds it), the check that the session is really ours, the
// identity check, and a lock_timeout for everything after.
func (o *owner) connect(ctx context.Context) error {
	r := o.r
	c, err := connectDedicated(ctx, r.connCfg, r.beforeConnect)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	ok := false
	defer func() {
		if !ok {
			c.Close(context.Background())
		}
	}()
	// The wait may last as long as a reshard: no statement_timeout or
	// lock_timeout the connection carries may cut it. SET LOCAL ends with
	// the transaction; the session-level lock does not.
	if err := pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, `SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = 0`); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, `SELECT pg_advisory_lock_shared($1, hashtext($2))`, migrations.LockKey+2, o.key)
		return err
	}); err != nil {
		return fmt.Errorf("member lock: %w", err)
	}
	// Behind a pooler in transaction mode the next statement may run in
	// another server session, which does not hold the lock just taken.
	var mine bool
	if err := c.QueryRow(ctx, `SELECT EXISTS (SELECT `+memberLocksSQL+` AND pid = pg_backend_pid())`, migrations.LockKey+2, o.key).Scan(&mine); err != nil {
		return fmt.Errorf("member lock: %w", err)
	}
	if !mine {
		return errSessionNeeded()
	}
	// No reshard can run from here until this session ends.
	if err := r.checkIdentity(ctx); err != nil {
		return err
	}
	// Taking a lease waits for statements of the old owner that hold its
	// row; never long, so that the loop renews the other leases in time.
	if _, err := c.Exec(ctx, `SET lock_timeout = `+strconv.FormatInt(max(r.cfg.ownerLease()/4, 100*time.Millisecond).Milliseconds(), 10)); err != nil {
		return fmt.Errorf("set lock_timeout: %w", err)
	}
	ok = true
	o.conn = c
	r.log.Info("ownership connected", "backend_pid", c.PgConn().PID())
	return nil
}

func errSessionNeeded() error {
	return fmt.Errorf("%w: the session that took the member lock does not hold it, so OUTBOX_DATABASE_URL goes through a connection pooler in transaction or statement mode "+
		"(such as PgBouncer's pool_mode=transaction), which breaks session advisory locks and LISTEN; connect directly, or through a pooler in session mode", ErrSessionNeeded)
}

// tick checks membership, renews leases, takes over stale shards, takes
// free shards up to the fair share and hands over the rest. An error means
// the session is gone, unless ownershipFatal says it must stop the relay.
func (o *owner) tick(ctx context.Context, shutting bool) error {
	r := o.r
	// Not cancelled with ctx: leases are renewed while shutdown finishes
	// the open batches. Bounded: a dead session must not hang the loop.
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), r.dbBudget())
	defer cancel()

	var members int
	var mine bool
	if err := o.conn.QueryRow(sctx, `SELECT count(*), coalesce(bool_or(pid = pg_backend_pid()), false) `+memberLocksSQL,
		migrations.LockKey+2, o.key).Scan(&members, &mine); err != nil {
		return err
	}
	if !mine {
		return errSessionNeeded()
	}

	var renew []outbox.Lease
	for s, w := range o.workers {
		if w.lease.live() {
			renew = append(renew, w.lease.Lease)
			w.stalled = false
			continue
		}
		if !w.stalled {
			w.stalled = true
			r.log.Warn("shard worker makes no progress: its lease is no longer renewed", "shard", s, "token", w.lease.Token, "lease", r.cfg.ownerLease().String())
		}
	}
	for _, l := range o.held {
		renew = append(renew, l)
	}
	lost, err := r.store.RenewLeases(sctx, o.conn, renew)
	if err != nil {
		return err
	}
	for _, s := range lost {
		if _, ok := o.held[s]; ok {
			o.release(s)
			continue
		}
		w := o.workers[s]
		if w == nil || w.stopping {
			continue
		}
		r.m.ShardsLost.WithLabelValues(strconv.Itoa(int(s))).Inc()
		r.log.Error("shard lost", "shard", s, "token", w.lease.Token, "reason", "another relay took its lease")
		r.kafka.shut()
		w.stopping = true
		w.cancel()
	}
	if shutting {
		return nil
	}

	if err := o.takeOverStale(sctx); err != nil {
		if o.conn.IsClosed() {
			return err
		}
		// Refused (the stale owner runs as another role, or as a
		// superuser): this instance's own shards are unaffected.
		if !o.takeoverFailing {
			r.log.Warn("cannot end the session of a stale shard owner; retrying every rebalance interval (run every instance as the same role, not a superuser)", "err", err)
		}
		o.takeoverFailing = true
	} else {
		o.takeoverFailing = false
	}

	if !r.kafka.open(r) {
		// Cut off from Kafka after losing a shard: take none (the
		// gate probes in the background).
		return nil
	}
	active := len(o.held)
	for _, w := range o.workers {
		if !w.stopping {
			active++
		}
	}
	fair := (r.cfg.Shards + max(members, 1) - 1) / max(members, 1)
	for i := 0; i < r.cfg.Shards && active < fair; i++ {
		s := int32((o.offset + i) % r.cfg.Shards)
		if _, held := o.held[s]; o.workers[s] != nil || held {
			continue
		}
		var got bool
		if err := o.conn.QueryRow(sctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, migrations.LockKey+3, shardKey(o.key, s)).Scan(&got); err != nil {
			return err
		}
		if !got {
			continue
		}
		l, err := r.store.TakeLease(sctx, o.conn, s, r.instance)
		if err != nil {
			// A statement of the old owner still holds the lease row
			// (lock_timeout): try again on the next tick.
			r.log.Warn("shard lease not taken, retrying", "shard", s, "err", err)
			o.unlock(ctx, s)
			if o.conn.IsClosed() {
				return err
			}
			continue
		}
		o.start(ctx, l, members, fair)
		active++
	}
	for s, w := range o.workers {
		if active <= fair {
			break
		}
		if w.stopping {
			continue
		}
		r.log.Info("shard handed over for balance", "shard", s, "members", members, "fair_share", fair)
		w.stopping = true
		w.cancel()
		active--
	}
	return nil
}

// takeOverStale ends the session of every other instance holding a shard
// whose lease expired (renewed_at older than OUTBOX_OWNER_LEASE by the
// database clock): its advisory locks go with the session, and the shards
// are free for the next try. Staleness and termination are one statement,
// so an owner that renewed meanwhile is left alone, and a pid cannot be
// confused with a later backend. The ended owner, if it ever resumes, finds
// its session gone and stops its workers; whatever they still try is fenced.
func (o *owner) takeOverStale(ctx context.Context) error {
	r := o.r
	// pg_terminate_backend waits for the session's end (up to $5 ms) from
	// PostgreSQL 14; 13 has only the one-argument form, which signals and
	// returns: the locks are free a moment later, and the next try finds
	// them so.
	terminate := `pg_terminate_backend(pid, $5)`
	args := []any{migrations.LockKey + 3, o.key, r.cfg.Shards, r.cfg.ownerLease().Seconds(), max(r.dbBudget()/2, 100*time.Millisecond).Milliseconds()}
	if !terminateWaits(o.conn.PgConn().ParameterStatus("server_version")) {
		terminate, args = `pg_terminate_backend(pid)`, args[:4]
	}
	rows, err := o.conn.Query(ctx, `WITH stale AS (
    SELECT o.shard, o.owner, extract(epoch FROM now() - o.renewed_at)::float8 AS age, l.pid
    FROM `+r.store.Table().OwnerIdent()+` o
    JOIN pg_locks l ON l.locktype = 'advisory' AND l.granted
      AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
      AND l.classid::bigint = $1 AND l.objid::bigint = (hashtext($2 || '/' || o.shard)::bigint & 4294967295) AND l.objsubid = 2
    WHERE o.shard < $3 AND o.renewed_at < now() - make_interval(secs => $4) AND l.pid <> pg_backend_pid()
), ended AS (
    SELECT pid, `+terminate+` AS ok FROM (SELECT DISTINCT pid FROM stale) p
)
SELECT s.shard, s.owner, s.age, s.pid, e.ok FROM stale s JOIN ended e USING (pid) ORDER BY s.shard`, args...)
	if err != nil {
		return err
	}
	defer rows.Close()
	for rows.Next() {
		var (
			shard int32
			old   string
			age   float64
			pid   int32
			ended bool
		)
		if err := rows.Scan(&shard, &old, &age, &pid, &ended); err != nil {
			return err
		}
		r.m.Takeovers.WithLabelValues(strconv.Itoa(int(shard))).Inc()
		r.log.Warn("taking over shard from a stale owner", "shard", shard, "old_owner", old,
			"lease_age", time.Duration(age*float64(time.Second)).Round(time.Millisecond).String(), "lease", r.cfg.ownerLease().String(),
			"old_backend_pid", pid, "session_ended", ended)
	}
	if err := rows.Err(); err != nil {
		return err
	}
	return nil
}

// start runs shard l.Shard's worker under lease l.
func (o *owner) start(ctx context.Context, l outbox.Lease, members, fair int) {
	r := o.r
	s := l.Shard
	wl := newLease(l, r.cfg.RebalanceInterval)
	wl.step(r.recoveryBudget())
	wctx, cancel := context.WithCancel(ctx)
	w := &worker{lease: wl, cancel: cancel, done: make(chan struct{})}
	o.workers[s] = w
	r.wake.add(s)
	r.m.OwnedShards.Set(float64(len(o.workers)))
	r.m.shardTaken(strconv.Itoa(int(s)))
	r.log.Info("shard taken", "shard", s, "token", l.Token, "members", members, "fair_share", fair)
	go func() {
		w.err = r.runShard(wctx, wl)
		close(w.done)
		select {
		case o.ended <- struct{}{}:
		default: // the loop reaps it on its next tick
		}
	}()
}

// reap forgets workers that ended, and abandons stopping workers that make
// no progress (their writes are fenced once another owner takes the shard),
// releasing their shards. It returns a worker's error that must stop the
// relay.
func (o *owner) reap() error {
	r := o.r
	var fatal error
	for s, w := range o.workers {
		select {
		case <-w.done:
			if haltsShard(w.err) && !w.stopping {
				o.hold(s, w)
				continue
			}
			o.remove(s)
			if stopsRelay(w.err) && fatal == nil {
				fatal = w.err
			}
			continue
		default:
		}
		if w.stopping && !w.lease.live() {
			r.log.Error("shard worker does not stop: abandoned; its writes are fenced by the next owner", "shard", s, "token", w.lease.Token)
			r.kafka.shut()
			o.remove(s)
		}
	}
	return fatal
}

// hold keeps shard s, whose worker stopped for good, taken: its lock and
// lease stay, and /readyz says why it does not run. It is seen beyond this
// instance too: outbox_relay_shard_stopped{shard} is 1 (the alert
// OutboxRelayShardStopped), and the shard's row of <table>_owner records
// when and why, for `outbox-relay status`.
//
// The shard is kept, not handed to a standby: the standby would stop on the
// same record in the checkpoint partition (after one more InitProducerID),
// and the way out (a new checkpoint topic, recorded by `reshard`) needs
// every relay of the table stopped anyway.
func (o *owner) hold(s int32, w *worker) {
	r := o.r
	delete(o.workers, s)
	o.held[s] = w.lease.Lease
	r.wake.remove(s)
	r.halt(s, w.err)
	r.m.ShardStopped.WithLabelValues(strconv.Itoa(int(s))).Set(1)
	if o.conn == nil {
		return // the session ended: the shard is released with it
	}
	ctx, cancel := context.WithTimeout(context.Background(), r.dbBudget())
	defer cancel()
	if err := r.store.RecordStopped(ctx, o.conn, w.lease.Lease, w.err.Error()); err != nil {
		r.log.Warn("the stopped shard is not recorded in the database: `outbox-relay status` does not show it (the metric and /readyz do)", "shard", s, "err", err)
	}
}

// release lets go of every held shard (or only s, when given).
func (o *owner) release(only ...int32) {
	for s := range o.held {
		if len(only) > 0 && only[0] != s {
			continue
		}
		delete(o.held, s)
		o.r.halt(s, nil)
		o.r.m.shardReleased(strconv.Itoa(int(s)))
		o.r.m.OwnedShards.Set(float64(len(o.workers) + len(o.held)))
		o.unlock(context.Background(), s)
	}
}

// remove forgets the worker of s and releases the shard's lock.
func (o *owner) remove(s int32) {
	r := o.r
	delete(o.workers, s)
	r.wake.remove(s)
	r.m.OwnedShards.Set(float64(len(o.workers) + len(o.held)))
	r.m.shardReleased(strconv.Itoa(int(s)))
	o.unlock(context.Background(), s)
}

func (o *owner) unlock(ctx context.Context, s int32) {
	if o.conn == nil {
		return
	}
	// Bounded: on a dead connection the lock is gone anyway.
	uctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if _, err := o.conn.Exec(uctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, migrations.LockKey+3, shardKey(o.key, s)); err != nil {
		o.r.log.Warn("release shard lock", "shard", s, "err", err)
	}
}

// stopAll cancels every worker; each finishes its open batch.
func (o *owner) stopAll() {
	for _, w := range o.workers {
		if !w.stopping {
			w.stopping = true
			w.cancel()
		}
	}
}

// lost handles the end of the ownership session: its locks are gone, so
// another instance may take the shards at once. Every worker is stopped; a
// worker still inside a batch is fenced by the new owner (InitProducerID in
// Kafka, the lease token in PostgreSQL).
func (o *owner) lost(err error) {
	r := o.r
	r.log.Error("ownership connection lost: releasing every shard", "err", err, "owned", len(o.workers))
	if len(o.workers) > 0 {
		// A standby may have ended this session because this instance
		// stopped making progress in Kafka: take no shard back before
		// Kafka answers a probe.
		r.kafka.shut()
	}
	for s, w := range o.workers {
		if w.stopping {
			continue
		}
		r.m.ShardsLost.WithLabelValues(strconv.Itoa(int(s))).Inc()
		r.log.Error("shard lost", "shard", s, "token", w.lease.Token, "reason", "ownership connection lost")
		w.stopping = true
		w.cancel()
	}
	o.closeConn()
}

func (o *owner) closeConn() {
	o.release()
	if o.conn != nil {
		o.conn.Close(context.Background())
		o.conn = nil
	}
}

func shardKey(table string, s int32) string { return table + "/" + strconv.Itoa(int(s)) }
