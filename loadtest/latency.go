package loadtest

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// LatencyConfig configures Latency.
type LatencyConfig struct {
	// Pool is where the writers write (the relay opens its own connections
	// from its configuration).
	Pool *pgxpool.Pool
	// Relay is the relay's configuration: its Schema and Table name the
	// table written to.
	Relay relay.Config
	// RelayOptions are passed to relay.New (a logger, for example).
	RelayOptions []relay.Option
	// KafkaOptions are the consumer's franz-go options besides its seed
	// brokers (Relay.KafkaBrokers): TLS and SASL, as relay.KafkaOptions
	// returns them.
	KafkaOptions []kgo.Opt
	// Topic is the topic the rows name; it must exist.
	Topic string
	// Rate is the rows committed per second; Duration how long the writers
	// write.
	Rate     int
	Duration time.Duration
	// RowBytes is the size of each value.
	RowBytes int
	// Writers is how many connections commit the rows, single-row
	// transactions spread evenly over them; 0 means 8.
	Writers int
	// Tail is how long to wait for the last rows once the writers are
	// done; 0 means 60 s.
	Tail time.Duration
}

// LatencyResult is what Latency measured.
type LatencyResult struct {
	// Rows is how many rows were committed; Rate their achieved rate
	// (rows over the time from the first commit to the last).
	Rows int     `json:"rows"`
	Rate float64 `json:"rate_rows_per_s"`
	// Behind is the most a writer started a row after its turn: a large
	// value means the database could not take the requested rate.
	Behind time.Duration `json:"writers_behind_ns"`
	// Percentiles of commit-to-consume latency: from just before a
	// writer's COMMIT until a read_committed consumer polled the record.
	P50 time.Duration `json:"p50_ns"`
	P90 time.Duration `json:"p90_ns"`
	P99 time.Duration `json:"p99_ns"`
	Max time.Duration `json:"max_ns"`
	// Missing rows never arrived; Duplicates are records beyond the first
	// of a row.
	Missing    int `json:"missing"`
	Duplicates int `json:"duplicates"`
}

// ExactlyOnce reports whether every row arrived exactly once.
func (l LatencyResult) ExactlyOnce() bool { return l.Missing == 0 && l.Duplicates == 0 }

// Latency runs a relay (relay.New with c.Relay) on its table while writers
// commit rows at c.Rate rows a second for c.Duration, in single-row
// transactions spread evenly over time and over c.Writers connections, and a
// read_committed consumer (from the topic's end, no group) measures, for
// every row, the time from just before its COMMIT until the consumer polled
// its record. Rows are matched by a run tag and sequence number at the start
// of their value. It checks that every row arrived exactly once; it returns
// an error only when it could not measure (Missing and Duplicates are in
// the result).
//
// The table should have no backlog: one warm-up row is written and awaited
// before the clock starts, so the relay's start-up and recovery are not
// measured.
func Latency(ctx context.Context, c LatencyConfig) (LatencyResult, error) {
	if c.Writers == 0 {
		c.Writers = 8
	}
	if c.Tail == 0 {
		c.Tail = time.Minute
	}
	n := int(float64(c.Rate) * c.Duration.Seconds())
	if c.Rate < 1 || n < 1 {
		return LatencyResult{}, fmt.Errorf("latency: -rate %d for -latency-duration %v makes no row: raise either", c.Rate, c.Duration)
	}
	t := outbox.Table{Schema: c.Relay.Schema, Name: c.Relay.Table}
	var tagBytes [4]byte
	_, _ = rand.Read(tagBytes[:])
	tag := "lt-" + hex.EncodeToString(tagBytes[:]) + " "

	parent := ctx
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	// The consumer starts at the topic's end, before anything is written.
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(c.Relay.KafkaBrokers...)}, c.KafkaOptions...)...)
	if err != nil {
		return LatencyResult{}, fmt.Errorf("latency: Kafka client: %w", err)
	}
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, c.Topic)
	cl.Close()
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		return LatencyResult{}, fmt.Errorf("latency: end offsets of %s: %w", c.Topic, err)
	}
	from := map[string]map[int32]kgo.Offset{c.Topic: {}}
	ends.Each(func(o kadm.ListedOffset) { from[c.Topic][o.Partition] = kgo.NewOffset().At(o.Offset) })
	consumer, err := kgo.NewClient(append([]kgo.Opt{
		kgo.SeedBrokers(c.Relay.KafkaBrokers...),
		kgo.ConsumePartitions(from),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	}, c.KafkaOptions...)...)
	if err != nil {
		return LatencyResult{}, fmt.Errorf("latency: Kafka consumer: %w", err)
	}
	defer consumer.Close()

	run, err := StartRelay(ctx, c.Pool, c.Relay, append(slices.Clone(c.RelayOptions), relay.WithRegisterer(prometheus.NewRegistry()))...)
	if err != nil {
		return LatencyResult{}, fmt.Errorf("latency: %w", err)
	}
	defer run.Stop() //nolint:errcheck // the result is reported below when it matters
	if err := run.WaitReady(ctx, time.Minute); err != nil {
		return LatencyResult{}, fmt.Errorf("latency: %w", err)
	}

	// The consumer: received[i] is when row i's first record was polled.
	received := make([]time.Time, n)
	counts := make([]int, n)
	warm := make(chan struct{})
	all := make(chan struct{})
	consumed := make(chan struct{})
	go func() {
		defer close(consumed)
		warmed, seen := false, 0
		for ctx.Err() == nil {
			fs := consumer.PollFetches(ctx)
			now := time.Now()
			fs.EachRecord(func(r *kgo.Record) {
				rest, ok := bytes.CutPrefix(r.Value, []byte(tag))
				if !ok {
					return
				}
				if bytes.HasPrefix(rest, []byte("warm ")) {
					if !warmed {
						warmed = true
						close(warm)
					}
					return
				}
				num, _, _ := bytes.Cut(rest, []byte(" "))
				i, err := strconv.Atoi(string(num))
				if err != nil || i < 0 || i >= n {
					return
				}
				if counts[i] == 0 {
					received[i] = now
					if seen++; seen == n {
						close(all)
					}
				}
				counts[i]++
			})
		}
	}()

	// write commits one row in a transaction of its own; at is the time
	// just before COMMIT.
	write := func(key int, value []byte, at *time.Time) error {
		tx, err := c.Pool.Begin(ctx)
		if err != nil {
			return err
		}
		defer tx.Rollback(ctx) //nolint:errcheck // after Commit, a no-op
		if err := t.Write(ctx, tx, outbox.Message{Topic: c.Topic, Key: []byte("acct-" + strconv.Itoa(key)), Value: value}); err != nil {
			return err
		}
		*at = time.Now()
		return tx.Commit(ctx)
	}
	var warmAt time.Time
	if err := write(0, Value(tag+"warm ", c.RowBytes), &warmAt); err != nil {
		return LatencyResult{}, fmt.Errorf("latency: write the warm-up row: %w", err)
	}
	select {
	case <-warm:
	case <-time.After(time.Minute):
		return LatencyResult{}, errors.New("latency: the warm-up row did not arrive within 1m: is the relay publishing? (run with OUTBOX_LOG_LEVEL=debug)")
	case <-ctx.Done():
		return LatencyResult{}, fmt.Errorf("latency: %w", context.Cause(ctx))
	}

	// The writers: row i is due at start + i/rate; writer w commits rows
	// w, w+W, w+2W, ...
	committed := make([]time.Time, n)
	behind := make([]time.Duration, c.Writers)
	errs := make([]error, c.Writers)
	var wg sync.WaitGroup
	start := time.Now()
	for w := range c.Writers {
		wg.Go(func() {
			for i := w; i < n; i += c.Writers {
				due := start.Add(time.Duration(float64(i) * float64(time.Second) / float64(c.Rate)))
				if d := time.Until(due); d > 0 {
					select {
					case <-time.After(d):
					case <-ctx.Done():
						errs[w] = context.Cause(ctx)
						return
					}
				} else {
					behind[w] = max(behind[w], -d)
				}
				if err := write(i%keys, Value(tag+strconv.Itoa(i)+" ", c.RowBytes), &committed[i]); err != nil {
					errs[w] = fmt.Errorf("row %d: %w", i, err)
					cancel()
					return
				}
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return LatencyResult{}, fmt.Errorf("latency: writers: %w", err)
	}

	// The tail: wait for the last rows, then a little for duplicates.
	select {
	case <-all:
		time.Sleep(200 * time.Millisecond)
	case <-time.After(c.Tail):
	case <-ctx.Done():
	}
	cancel()
	<-consumed
	if err := parent.Err(); err != nil {
		return LatencyResult{}, fmt.Errorf("latency: %w", context.Cause(parent))
	}

	res := LatencyResult{Rows: n, Behind: slices.Max(behind)}
	first, last := slices.MinFunc(committed, time.Time.Compare), slices.MaxFunc(committed, time.Time.Compare)
	if d := last.Sub(first); d > 0 {
		res.Rate = float64(n-1) / d.Seconds()
	}
	lat := make([]time.Duration, 0, n)
	for i := range n {
		switch {
		case counts[i] == 0:
			res.Missing++
		default:
			res.Duplicates += counts[i] - 1
			lat = append(lat, received[i].Sub(committed[i]))
		}
	}
	if len(lat) > 0 {
		slices.Sort(lat)
		q := func(p float64) time.Duration { return lat[min(len(lat)-1, int(p*float64(len(lat))))] }
		res.P50, res.P90, res.P99, res.Max = q(0.50), q(0.90), q(0.99), lat[len(lat)-1]
	}
	return res, nil
}
