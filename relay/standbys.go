package relay

import (
	"context"
	"fmt"
	"time"

	"github.com/outbox-relay/outbox-relay/standby"
)

// newStandbyBarrier is the OUTBOX_STANDBY_NAMES barrier, reporting to m.
func newStandbyBarrier(db standby.Querier, names []string, m *Metrics) (*standby.Barrier, error) {
	b, err := standby.New(db, names)
	if err != nil {
		return nil, err
	}
	for _, n := range names {
		m.StandbyConnected.WithLabelValues(n).Set(0)
		m.StandbyLag.WithLabelValues(n).Set(-1)
	}
	b.Observe = func(states []standby.State) {
		for _, s := range states {
			c := 0.0
			if s.Connected {
				c = 1
			}
			m.StandbyConnected.WithLabelValues(s.Name).Set(c)
			m.StandbyLag.WithLabelValues(s.Name).Set(float64(s.LagBytes))
		}
	}
	return b, nil
}

// waitForStandbys holds the batch about to be published until the
// OUTBOX_STANDBY_NAMES standbys have flushed the WAL up to now: past the
// commits of the rows read, and past the marks of every batch whose mark
// committed before that read. The worker's lease stays live while it
// waits (each poll is a step), and a wait that lasts is logged once and
// shown in outbox_relay_standby_held_seconds.
func (r *Relay) waitForStandbys(ctx context.Context, l *lease) error {
	if r.standbys == nil {
		return nil
	}
	start := time.Now()
	logged := false
	b := *r.standbys
	b.Step = func(d time.Duration) {
		l.step(d)
		held := time.Since(start)
		if held > time.Second {
			r.m.StandbyHeld.Set(held.Seconds())
			if !logged {
				logged = true
				r.log.Warn("publishing is held: a standby named in OUTBOX_STANDBY_NAMES is missing or behind; a fail-over to it could otherwise lose rows Kafka holds",
					"standbys", r.cfg.StandbyNames, "shard", l.Shard)
			}
		}
	}
	waited, err := b.Wait(ctx)
	r.m.StandbyHeld.Set(0)
	if err != nil {
		return fmt.Errorf("shard %d: %w", l.Shard, err)
	}
	r.m.StandbyWait.Observe(waited.Seconds())
	if logged {
		r.log.Info("publishing resumes: the standbys have the rows", "standbys", r.cfg.StandbyNames, "shard", l.Shard, "held", waited.Round(time.Millisecond).String())
	}
	return nil
}
