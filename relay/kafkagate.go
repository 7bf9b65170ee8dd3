package relay

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/outbox-relay/outbox-relay/txn"
)

// errKafkaUnreachable ends a shard's worker whose batch or recovery failed
// while this instance could not reach Kafka: the shard is given up (its
// lock released) so that a standby that reaches Kafka takes it.
var errKafkaUnreachable = errors.New("kafka unreachable from this instance: shard given up")

// kafkaGate keeps an instance that cannot reach Kafka from taking shards.
// It is closed (no shard taken) after this instance lost or gave up a shard,
// until a probe of Kafka through the instance's own path succeeds. So a
// cut-off owner whose session a standby ended does not reconnect and take
// the shard back within milliseconds, before the standby's own attempt
// (I6). Liveness when every instance lost Kafka: each one probes on every
// rebalance tick, and the first probe that succeeds once Kafka is back
// opens its gate; the shard is then taken by the fair-share loop.
type kafkaGate struct {
	mu      sync.Mutex
	closed  bool
	probing bool
	since   time.Time
}

// shut closes the gate until a probe succeeds.
func (g *kafkaGate) shut() {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed {
		g.closed, g.since = true, time.Now()
	}
}

// open reports whether shards may be taken. While closed, it starts one
// probe at a time in the background (the ownership loop goes on renewing
// the leases it holds meanwhile); a probe that succeeds opens the gate for
// the next tick.
func (g *kafkaGate) open(r *Relay) bool {
	g.mu.Lock()
	defer g.mu.Unlock()
	if !g.closed {
		return true
	}
	if !g.probing {
		g.probing = true
		go func() {
			ctx, cancel := context.WithTimeout(context.Background(), r.kafkaProbeTimeout())
			err := txn.Ping(ctx, r.tcfg)
			cancel()
			g.mu.Lock()
			defer g.mu.Unlock()
			g.probing = false
			if err == nil {
				r.log.Info("kafka reachable again: shards may be taken", "closed_for", time.Since(g.since).Round(time.Millisecond).String())
				g.closed = false
				return
			}
			r.log.Warn("kafka unreachable from this instance: taking no shard", "err", err, "since", time.Since(g.since).Round(time.Millisecond).String())
		}()
	}
	return false
}

// kafkaReachable probes Kafka now, within kafkaProbeTimeout.
func (r *Relay) kafkaReachable(ctx context.Context) bool {
	ctx, cancel := context.WithTimeout(ctx, r.kafkaProbeTimeout())
	defer cancel()
	return txn.Ping(ctx, r.tcfg) == nil
}

// kafkaProbeTimeout bounds one probe: the request timeout, at most half of
// OUTBOX_OWNER_LEASE.
func (r *Relay) kafkaProbeTimeout() time.Duration {
	d := r.cfg.ownerLease() / 2
	if rt := r.tcfg.Settings.RequestTimeout; rt > 0 && rt < d {
		d = rt
	}
	return d
}
