package outbox

import (
	"context"
	"fmt"
)

// MakeVisibleDurable returns once every commit visible now is durable in
// the WAL, so that rows just read may be published. A writer with
// synchronous_commit=off has its commit acknowledged and visible before its
// WAL is flushed: a row the relay published then could vanish in a database
// crash, leaving Kafka with an event of a transaction that never happened.
//
// Every commit visible to a statement has its commit record before the
// current WAL insert position, so when the flush position has passed it
// there is nothing to do. Otherwise the statement locks the shard's owner
// row FOR KEY SHARE: a row lock writes WAL and takes a transaction id, so
// the statement's commit (at least locally durable: the relay's connections
// never commit with synchronous_commit=off) flushes the WAL up to its own
// commit record, and with it every earlier commit. It is one round trip
// either way, and it returns ErrLeaseLost if l is no longer current (a relay
// that lost the shard then stops before producing).
//
// FOR KEY SHARE, not an UPDATE of the owner row: a pipelined mark in flight
// holds that row FOR SHARE until it commits (the lease check of every mark),
// and an UPDATE would wait for it, putting the mark back on the loop's
// critical path. Two share locks do not wait for each other; a takeover's
// UPDATE of the token still waits for both.
func (s *Store) MakeVisibleDurable(ctx context.Context, l Lease) error {
	var held bool
	err := s.pool.QueryRow(ctx, `WITH behind AS MATERIALIZED (
    SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn() AS yes
), flush AS MATERIALIZED (
    SELECT FROM `+s.t.OwnerIdent()+` WHERE shard = $1 AND token = $2 AND (SELECT yes FROM behind) FOR KEY SHARE
)
SELECT EXISTS (SELECT FROM `+s.t.OwnerIdent()+` WHERE shard = $1 AND token = $2) AND
    (NOT (SELECT yes FROM behind) OR EXISTS (SELECT FROM flush))`, l.Shard, l.Token).Scan(&held)
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return fmt.Errorf("flush the WAL before publishing rows of shard %d of %s: %w", l.Shard, s.t, err)
	}
	return nil
}
