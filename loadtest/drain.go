package loadtest

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// loadChunk is the most rows Load writes in one transaction.
const loadChunk = 10000

// keys is how many distinct keys the loaded rows cycle over.
const keys = 1000

// Value returns a value of size bytes (at least the prefix) that starts with
// prefix and is padded with letters.
func Value(prefix string, size int) []byte {
	v := make([]byte, max(size, len(prefix)))
	copy(v, prefix)
	for i := len(prefix); i < len(v); i++ {
		v[i] = 'a' + byte(i%26)
	}
	return v
}

// Load empties table t (TRUNCATE, without resetting its id sequence) and
// writes n rows of topic, values of size bytes, keys cycling over 1000
// accounts, with COPY (outbox.Table.WriteMany) in transactions of at most
// 10000 rows; then VACUUM ANALYZE, so that every round starts alike.
// No relay may run on t meanwhile.
func Load(ctx context.Context, pool *pgxpool.Pool, t outbox.Table, topic string, n, size int) error {
	if _, err := pool.Exec(ctx, `TRUNCATE `+t.Ident()); err != nil {
		return fmt.Errorf("load rows: empty %s: %w", t, err)
	}
	v := Value("", size)
	msgs := make([]outbox.Message, min(n, loadChunk))
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: topic, Key: []byte("acct-" + strconv.Itoa(i%keys)), Value: v}
	}
	for done := 0; done < n; {
		m := min(n-done, loadChunk)
		if err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error { return t.WriteMany(ctx, tx, msgs[:m]) }); err != nil {
			return fmt.Errorf("load rows: write %d rows into %s: %w", m, t, err)
		}
		done += m
	}
	if _, err := pool.Exec(ctx, `VACUUM ANALYZE `+t.Ident()); err != nil {
		return fmt.Errorf("load rows: vacuum %s: %w", t, err)
	}
	return nil
}

// DrainCeiling is the database-only ceiling: no Kafka at all. For each of
// shards shards at once, it reads a batch of every column of the
// unpublished rows in id order with the relay's shard filter
// (outbox.ShardFilter), then marks the batch published (UPDATE ... WHERE id
// = ANY) or deletes it (on), and repeats until the shard has no row left. It
// returns the time taken and the rows drained.
func DrainCeiling(ctx context.Context, pool *pgxpool.Pool, t outbox.Table, batch, shards int, on outbox.OnPublish) (time.Duration, int, error) {
	var done string
	switch on {
	case outbox.Mark:
		done = `UPDATE ` + t.Ident() + ` SET published_at = now() WHERE id = ANY($1) AND published_at IS NULL`
	case outbox.Delete:
		done = `DELETE FROM ` + t.Ident() + ` WHERE id = ANY($1)`
	default:
		return 0, 0, fmt.Errorf("ceiling: on-publish %q: expected mark or delete", on)
	}
	start := time.Now()
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		total int
		errs  []error
	)
	for s := range shards {
		wg.Go(func() {
			n, err := drainShard(ctx, pool, t, done, batch, s, shards)
			mu.Lock()
			defer mu.Unlock()
			total += n
			if err != nil {
				errs = append(errs, fmt.Errorf("ceiling: shard %d: %w", s, err))
			}
		})
	}
	wg.Wait()
	return time.Since(start), total, errors.Join(errs...)
}

// drainShard is one shard's loop of DrainCeiling.
func drainShard(ctx context.Context, pool *pgxpool.Pool, t outbox.Table, done string, batch, shard, shards int) (int, error) {
	filter, fargs := outbox.ShardFilter(shard, shards, 2)
	read := `SELECT id, topic, key, value, headers::text, partition, created_at, event_id::text FROM ` + t.Ident() +
		` WHERE published_at IS NULL` + filter + ` ORDER BY id LIMIT $1`
	args := append([]any{batch}, fargs...)
	var (
		total   int
		ids     []int64
		id      int64
		topic   string
		key, v  []byte
		h       *string
		p       *int32
		created time.Time
		event   *string
	)
	for {
		rows, err := pool.Query(ctx, read, args...)
		if err != nil {
			return total, fmt.Errorf("read a batch: %w", err)
		}
		ids = ids[:0]
		if _, err := pgx.ForEachRow(rows, []any{&id, &topic, &key, &v, &h, &p, &created, &event}, func() error {
			ids = append(ids, id)
			return nil
		}); err != nil {
			return total, fmt.Errorf("read a batch: %w", err)
		}
		if len(ids) == 0 {
			return total, nil
		}
		if _, err := pool.Exec(ctx, done, ids); err != nil {
			return total, fmt.Errorf("mark a batch of %d rows: %w", len(ids), err)
		}
		total += len(ids)
	}
}

// Drain is what DrainRelay measured.
type Drain struct {
	// Rows is how many rows the relay published.
	Rows int
	// Elapsed is from the relay's start until it had published every row.
	Elapsed time.Duration
	// Start is from the relay's start until its first published rows were
	// seen (start-up, ownership, recovery and the first batch), and
	// FirstRows how many they were.
	Start     time.Duration
	FirstRows int
}

// Rate is the rows a second over Elapsed, the relay's start included.
func (d Drain) Rate() float64 { return float64(d.Rows) / d.Elapsed.Seconds() }

// SteadyRate is the rows a second from the first published rows to the
// last, without the relay's start; 0 when there is nothing after the first.
func (d Drain) SteadyRate() float64 {
	if d.Rows <= d.FirstRows || d.Elapsed <= d.Start {
		return 0
	}
	return float64(d.Rows-d.FirstRows) / (d.Elapsed - d.Start).Seconds()
}

// DrainRelay starts a relay (relay.New with cfg on pool, opts added) on the
// loaded rows and measures the time from its start (start-up and recovery
// included) until it has published rows rows
// (outbox_relay_published_records_total, counted once marked), polled every
// 10 ms (a gather of the relay's metrics costs CPU the relay shares). It stops the relay before it returns. It gives up after timeout (0:
// 10 minutes).
func DrainRelay(ctx context.Context, pool *pgxpool.Pool, cfg relay.Config, rows int, timeout time.Duration, opts ...relay.Option) (Drain, error) {
	if timeout == 0 {
		timeout = 10 * time.Minute
	}
	reg := prometheus.NewRegistry()
	start := time.Now()
	run, err := StartRelay(ctx, pool, cfg, append(slices.Clone(opts), relay.WithRegisterer(reg))...)
	if err != nil {
		return Drain{}, err
	}
	d := Drain{Rows: rows}
	err = func() error {
		tick := time.NewTicker(10 * time.Millisecond)
		defer tick.Stop()
		for {
			n, err := Published(reg)
			if err != nil {
				return err
			}
			if n > 0 && d.FirstRows == 0 {
				d.Start, d.FirstRows = time.Since(start), n
			}
			if n >= rows {
				d.Elapsed = time.Since(start)
				return nil
			}
			if time.Since(start) > timeout {
				return fmt.Errorf("relay drain: %d of %d rows published after %v", n, rows, timeout)
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("relay drain: %w", context.Cause(ctx))
			case err := <-run.done:
				run.done <- err
				return fmt.Errorf("relay drain: the relay stopped after %d of %d rows: %v", n, rows, err)
			case <-tick.C:
			}
		}
	}()
	if serr := run.Stop(); serr != nil && err == nil {
		err = fmt.Errorf("relay drain: stop the relay: %w", serr)
	}
	return d, err
}

// Published sums outbox_relay_published_records_total over the shards: rows
// published in a committed Kafka transaction and then marked.
func Published(g prometheus.Gatherer) (int, error) {
	mfs, err := g.Gather()
	if err != nil {
		return 0, fmt.Errorf("gather relay metrics: %w", err)
	}
	var n float64
	for _, mf := range mfs {
		if mf.GetName() != "outbox_relay_published_records_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			n += m.GetCounter().GetValue()
		}
	}
	return int(n), nil
}

// Running is a relay running in this process (StartRelay).
type Running struct {
	// Relay is the running relay.
	Relay  *relay.Relay
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// StartRelay creates a relay with relay.New and runs it in a goroutine
// until Stop.
func StartRelay(ctx context.Context, pool *pgxpool.Pool, cfg relay.Config, opts ...relay.Option) (*Running, error) {
	r, err := relay.New(cfg, pool, opts...)
	if err != nil {
		return nil, fmt.Errorf("start the relay: %w", err)
	}
	rctx, cancel := context.WithCancel(ctx)
	run := &Running{Relay: r, cancel: cancel, done: make(chan error, 1)}
	go func() { run.done <- r.Run(rctx) }()
	return run, nil
}

// WaitReady waits until the relay is ready (started, its shards recovered
// and running) or has stopped, for at most timeout.
func (r *Running) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for !r.Relay.Ready() {
		select {
		case err := <-r.done:
			r.done <- err
			return fmt.Errorf("the relay stopped before it was ready: %v", err)
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(10 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("the relay is not ready after %v: %s", timeout, r.Relay.NotReady())
		}
	}
	return nil
}

// Stop cancels the relay, waits for its clean shutdown and returns what
// Run returned.
func (r *Running) Stop() error {
	r.once.Do(func() {
		r.cancel()
		r.err = <-r.done
	})
	return r.err
}
