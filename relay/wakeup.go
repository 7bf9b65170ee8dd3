package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgconn/ctxwatch"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// waker wakes idle shard workers within milliseconds of a commit without
// making the writers pay for NOTIFY under load.
//
// The insert trigger notifies only when its shared try-lock on the table's
// wake-up advisory lock succeeds. The waker holds that lock exclusively, on
// its own connection, while every owned shard is busy, so under load writers
// skip the NOTIFY (and the commit serialization it causes); as soon as one
// shard goes idle the waker releases the lock and the next commit notifies.
//
// A worker that runs out of rows keeps the lock for a short grace period
// while it polls again after 2, 4, 8 and 16 ms, so that writers under steady
// load never notify. A transaction that inserted while the lock was held and
// commits after the worker's last poll sends no notification; the worker
// covers it by polling on at growing intervals up to the poll interval.
type waker struct {
	connCfg *pgx.ConnConfig
	// beforeConnect gives each connection fresh credentials (pgauth).
	beforeConnect func(context.Context, *pgx.ConnConfig) error
	table         outbox.Table
	log           *slog.Logger

	mu    sync.Mutex
	idle  map[int32]bool // owned shards: true when idle
	gen   chan struct{}  // closed on a notification, then replaced
	kick  chan struct{}  // the wanted lock state may have changed
	ready bool
}

// newWaker listens on connections of connCfg (prepared by prepareConnConfig:
// keepalives and a user timeout).
func newWaker(connCfg *pgx.ConnConfig, before func(context.Context, *pgx.ConnConfig) error, t outbox.Table, log *slog.Logger) *waker {
	cfg := connCfg.Copy()
	// A cancelled wait must not cost a cancel-request connection: just
	// interrupt the read.
	cfg.BuildContextWatcherHandler = func(pc *pgconn.PgConn) ctxwatch.Handler {
		return &pgconn.DeadlineContextWatcherHandler{Conn: pc.Conn()}
	}
	return &waker{connCfg: cfg, beforeConnect: before, table: t, log: log, idle: map[int32]bool{},
		gen: make(chan struct{}), kick: make(chan struct{}, 1)}
}

// wait returns a channel closed by the next notification. Take it before
// polling, so a notification between the poll and the wait is not missed.
func (w *waker) wait() <-chan struct{} {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.gen
}

func (w *waker) broadcast() {
	w.mu.Lock()
	close(w.gen)
	w.gen = make(chan struct{})
	w.mu.Unlock()
}

// add registers an owned shard (busy until it says otherwise); setIdle
// records whether it is idle; remove forgets it. A worker the ownership loop
// has forgotten (abandoned) changes nothing here.
func (w *waker) add(shard int32) {
	w.mu.Lock()
	w.idle[shard] = false
	w.mu.Unlock()
	w.poke()
}

func (w *waker) setIdle(shard int32, idle bool) {
	w.mu.Lock()
	was, owned := w.idle[shard]
	changed := owned && was != idle
	if owned {
		w.idle[shard] = idle
	}
	w.mu.Unlock()
	if changed {
		w.poke()
	}
}

func (w *waker) remove(shard int32) {
	w.mu.Lock()
	delete(w.idle, shard)
	w.mu.Unlock()
	w.poke()
}

func (w *waker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// wantLock: hold the lock (writers skip NOTIFY) only while every owned shard
// is busy.
func (w *waker) wantLock() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	if len(w.idle) == 0 {
		return false
	}
	for _, idle := range w.idle {
		if idle {
			return false
		}
	}
	return true
}

// run keeps the listening connection open until ctx ends, reconnecting with
// a back-off. While it is down, workers fall back to polling.
func (w *waker) run(ctx context.Context) {
	backoff := 100 * time.Millisecond
	for ctx.Err() == nil {
		err := w.listen(ctx)
		if ctx.Err() != nil {
			return
		}
		w.log.Warn("wake-up listener lost, workers poll until it is back", "err", err, "retry_in", backoff.String())
		w.broadcast()
		select {
		case <-ctx.Done():
			return
		case <-time.After(jittered(backoff)):
		}
		backoff = min(2*backoff, 10*time.Second)
	}
}

func (w *waker) listen(ctx context.Context) error {
	conn, err := connectDedicated(ctx, w.connCfg, w.beforeConnect)
	if err != nil {
		return fmt.Errorf("connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	if _, err := conn.Exec(ctx, "LISTEN "+migrations.QuoteIdent(w.table.WakeChannel())); err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	// Taking the lock waits at most this long (another instance may hold it).
	if _, err := conn.Exec(ctx, "SET lock_timeout = '500ms'"); err != nil {
		return fmt.Errorf("set lock_timeout: %w", err)
	}
	key2 := w.table.String()
	holding := false
	w.log.Debug("wake-up listener connected", "channel", w.table.WakeChannel())
	for {
		if want := w.wantLock(); want != holding {
			var err error
			if want {
				// A blocking request, not a try: under load some writer
				// always holds the shared lock from its insert to its
				// commit, so a try-lock would never succeed (measured:
				// writers kept notifying and lost 73% of their
				// throughput). A queued exclusive request makes
				// PostgreSQL refuse every new shared try-lock, so writers
				// stop notifying at once, and the lock is granted within
				// one commit. lock_timeout bounds the wait when another
				// instance holds it, which silences writers all the same.
				_, err = conn.Exec(ctx, `SELECT pg_advisory_lock($1, hashtext($2))`, migrations.LockKey, key2)
				holding = err == nil
				var pgErr *pgconn.PgError
				if errors.As(err, &pgErr) && pgErr.Code == "55P03" { // lock_not_available
					err = nil
				}
			} else {
				_, err = conn.Exec(ctx, `SELECT pg_advisory_unlock($1, hashtext($2))`, migrations.LockKey, key2)
				holding = false
			}
			if err != nil {
				return fmt.Errorf("wake-up lock: %w", err)
			}
		}
		wctx, cancel := context.WithTimeout(ctx, time.Second)
		go func() {
			select {
			case <-w.kick:
				cancel()
			case <-wctx.Done():
			}
		}()
		_, err := conn.WaitForNotification(wctx)
		cancel()
		switch {
		case err == nil:
			w.broadcast()
		case ctx.Err() != nil:
			return ctx.Err()
		case pgconn.Timeout(err) || errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded):
			// a kick or the periodic re-check of the lock
		default:
			return fmt.Errorf("wait for notification: %w", err)
		}
	}
}
