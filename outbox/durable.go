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
// there is nothing to do (one round trip). Otherwise it commits a write of
// its own, at least locally durable (the relay's connections never commit
// with synchronous_commit=off), which flushes the WAL up to it, and with it
// every earlier commit: it renews the shard's lease, and returns ErrLeaseLost
// if l is no longer current (a relay that lost the shard then stops before
// producing).
func (s *Store) MakeVisibleDurable(ctx context.Context, l Lease) error {
	var flushed bool
	if err := s.pool.QueryRow(ctx, `SELECT pg_current_wal_flush_lsn() >= pg_current_wal_insert_lsn()`).Scan(&flushed); err != nil {
		return fmt.Errorf("compare the WAL flush and insert positions: %w", err)
	}
	if flushed {
		return nil
	}
	tag, err := s.pool.Exec(ctx, `UPDATE `+s.t.OwnerIdent()+` SET renewed_at = now() WHERE shard = $1 AND token = $2`, l.Shard, l.Token)
	if err == nil && tag.RowsAffected() == 0 {
		err = ErrLeaseLost
	}
	if err != nil {
		return fmt.Errorf("flush the WAL before publishing rows of shard %d of %s: %w", l.Shard, s.t, err)
	}
	return nil
}
