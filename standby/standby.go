// Package standby holds publishing until named physical standbys have the
// rows to publish (OUTBOX_STANDBY_NAMES).
//
// A row is published only once every standby that may be promoted has
// flushed its commit: a fail-over to one of them then finds every row that
// Kafka holds, so Kafka never holds an event of a transaction the new
// primary never had (a phantom). PostgreSQL 17's synchronized_standby_slots
// does the same for logical slots; this is it for an outbox read.
//
// The barrier's position is the primary's WAL insert position when it is
// asked: past the commit of every row the relay read before, and past the
// marks of the relay's batches that committed before that read, so a
// promotion also finds those marks and republishes nothing but the last
// batches, which the checkpoint's recovery window marks again.
package standby

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// Querier is what the barrier needs of a database handle: a pool fits.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// State is one standby's position relative to the barrier's target.
type State struct {
	// Name is the standby's application_name.
	Name string
	// Connected reports whether pg_stat_replication lists it.
	Connected bool
	// LagBytes is how far its flushed WAL is behind the target (0 once it
	// has reached it; -1 when it is not connected).
	LagBytes int64
}

// Barrier waits for the standbys. It is safe for concurrent use: each Wait
// has its own target.
type Barrier struct {
	names []string
	db    Querier
	// Observe, when set, is called with every poll's states.
	Observe func([]State)
	// Step, when set, is called before every poll with the time the poll
	// may take (the relay's lease bound on a worker's steps).
	Step func(time.Duration)
	// MaxPoll is the longest pause between polls (default 50 ms).
	MaxPoll time.Duration
}

// New returns a barrier for the named standbys (application_name in the
// primary's pg_stat_replication).
func New(db Querier, names []string) (*Barrier, error) {
	seen := map[string]bool{}
	for _, n := range names {
		if strings.TrimSpace(n) == "" {
			return nil, errors.New("OUTBOX_STANDBY_NAMES has an empty name: list the standbys' application_name values, separated by commas")
		}
		if seen[n] {
			return nil, fmt.Errorf("OUTBOX_STANDBY_NAMES names %q twice", n)
		}
		seen[n] = true
	}
	return &Barrier{names: names, db: db, MaxPoll: 50 * time.Millisecond}, nil
}

// Names are the standbys the barrier waits for.
func (b *Barrier) Names() []string { return b.names }

// CheckAccess fails unless the relay's role may read the standbys'
// positions: pg_stat_replication shows them only to superusers and members
// of pg_read_all_stats (pg_monitor includes it), and a barrier that cannot
// see them would wait for ever.
func (b *Barrier) CheckAccess(ctx context.Context) error {
	var ok, recovery bool
	err := b.db.QueryRow(ctx, `SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
    OR (SELECT rolsuper FROM pg_roles WHERE rolname = current_user), pg_is_in_recovery()`).Scan(&ok, &recovery)
	if err != nil {
		return fmt.Errorf("OUTBOX_STANDBY_NAMES: check access to pg_stat_replication: %w", err)
	}
	if recovery {
		return errors.New("OUTBOX_STANDBY_NAMES: the database is a standby (in recovery): point OUTBOX_DATABASE_URL at the primary")
	}
	if !ok {
		return errors.New("OUTBOX_STANDBY_NAMES: the relay's role cannot read the standbys' positions in pg_stat_replication: GRANT pg_read_all_stats TO <the relay's role> (or pg_monitor), or unset OUTBOX_STANDBY_NAMES")
	}
	return nil
}

// poll reads the standbys' flushed positions against target (the current
// insert position when target is empty), and returns the target used.
func (b *Barrier) poll(ctx context.Context, target string) (string, []State, error) {
	rows, err := b.db.Query(ctx, `WITH t AS MATERIALIZED (SELECT coalesce($2::pg_lsn, pg_current_wal_insert_lsn()) AS lsn)
SELECT (SELECT lsn FROM t)::text, n.name, r.flush IS NOT NULL,
    coalesce(greatest(pg_wal_lsn_diff((SELECT lsn FROM t), r.flush), 0), -1)::bigint
FROM unnest($1::text[]) WITH ORDINALITY AS n(name, i)
LEFT JOIN LATERAL (SELECT max(flush_lsn) AS flush FROM pg_stat_replication WHERE application_name = n.name) r ON true
ORDER BY n.i`, b.names, nullIfEmpty(target))
	if err != nil {
		return "", nil, fmt.Errorf("read the standbys' positions: %w", err)
	}
	var states []State
	for rows.Next() {
		var s State
		if err := rows.Scan(&target, &s.Name, &s.Connected, &s.LagBytes); err != nil {
			return "", nil, fmt.Errorf("read the standbys' positions: %w", err)
		}
		states = append(states, s)
	}
	if err := rows.Err(); err != nil {
		return "", nil, fmt.Errorf("read the standbys' positions: %w", err)
	}
	return target, states, nil
}

func nullIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}

// Wait returns once every named standby has flushed the primary's WAL up to
// the insert position at the time of the call, or when ctx ends. A standby
// missing from pg_stat_replication is waited for like one behind.
func (b *Barrier) Wait(ctx context.Context) (time.Duration, error) {
	start := time.Now()
	pause := 500 * time.Microsecond
	target := ""
	for {
		if b.Step != nil {
			b.Step(time.Second + pause)
		}
		t, states, err := b.poll(ctx, target)
		if err != nil {
			return time.Since(start), err
		}
		target = t
		if b.Observe != nil {
			b.Observe(states)
		}
		done := true
		for _, s := range states {
			if !s.Connected || s.LagBytes > 0 {
				done = false
			}
		}
		if done {
			return time.Since(start), nil
		}
		select {
		case <-ctx.Done():
			return time.Since(start), fmt.Errorf("waiting for standbys %s to reach %s: %w", strings.Join(b.names, ","), target, ctx.Err())
		case <-time.After(pause):
		}
		pause = min(2*pause, b.MaxPoll)
	}
}

// Read reads the standbys' states now (for `outbox-relay status`).
func (b *Barrier) Read(ctx context.Context) ([]State, error) {
	_, states, err := b.poll(ctx, "")
	return states, err
}
