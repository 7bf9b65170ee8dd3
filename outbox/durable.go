package outbox

import (
	"context"
	"strconv"
)

// ReadDurable is ReadBatch for rows about to be published by the owner of
// lease l, without the rows whose ids are in skip: it returns only once
// every commit the read saw is durable in the WAL. A writer with
// synchronous_commit=off has its commit acknowledged and visible before its
// WAL is flushed: a row the relay published then could vanish in a
// database crash, leaving Kafka with an event of a transaction that never
// happened.
//
// It is one statement, one round trip. Its snapshot is taken before it
// compares the WAL positions, so every commit the read sees has its commit
// record before the insert position compared: when the flush position has
// passed that, there is nothing to do. Otherwise the statement locks the
// shard's owner row FOR KEY SHARE: a row lock writes WAL and takes a
// transaction id, so the statement's own commit (at least locally durable:
// the relay's connections never commit with synchronous_commit=off) flushes
// the WAL up to its commit record, and with it every commit the read saw.
// That commit ends before the statement's answer does (the client reads up
// to ReadyForQuery). It returns ErrLeaseLost when it had to flush and l is
// no longer current (a relay that lost the shard then stops before
// producing). A read that finds no row makes nothing durable: there is
// nothing to publish.
//
// With synchronous standbys (synchronous_standby_names set), durable means
// flushed on them too, whatever synchronous_commit the writers use: a
// writer at local or off has its commit acknowledged before any standby
// has it, and a promotion of that standby would lose a row Kafka holds.
// So the read is also behind while the synchronous standbys' flushed
// position (pg_stat_replication; unknown to a role without
// pg_read_all_stats, which then always counts as behind) is before the
// insert position, and then its commit runs with synchronous_commit raised
// to on (set_config, local to the statement's transaction): it returns
// only once the synchronous standbys flushed it, and every commit the read
// saw before it.
//
// FOR KEY SHARE, not an UPDATE of the owner row: a pipelined mark in flight
// holds that row FOR SHARE until it commits (the lease check of every mark),
// and an UPDATE would wait for it, putting the mark back on the loop's
// critical path. Two share locks do not wait for each other; a takeover's
// UPDATE of the token does not wait for this one.
//
// skip is for a pipelined loop, whose batches read are still in flight (in
// a Kafka transaction, or committed with their mark not yet durable): the
// read leaves them out by id, and reads from the start of the shard's
// unpublished rows otherwise, so that a row below them that became readable
// since (committed late, released by `dlq discard`, put back by `dlq
// requeue`) is read now, in id order, before the later rows of its key
// (I4).
func (s *Store) ReadDurable(ctx context.Context, l Lease, shards, limit int, maxBytes int64, skip []int64) ([]Row, error) {
	return s.read(ctx, &l, int(l.Shard), shards, limit, maxBytes, skip)
}

// durableRead wraps a read statement so that every row also carries
// whether the statement made the commits it sees durable (see ReadDurable);
// the lease's shard and token are parameters argN and argN+1.
func (s *Store) durableRead(read string, argN int) string {
	shard, token := "$"+strconv.Itoa(argN), "$"+strconv.Itoa(argN+1)
	return `WITH behind AS MATERIALIZED (
    SELECT pg_current_wal_flush_lsn() < pg_current_wal_insert_lsn()
        OR (current_setting('synchronous_standby_names') <> '' AND coalesce(
            (SELECT min(flush_lsn) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum')), '0/0') < pg_current_wal_insert_lsn()) AS yes
), synchronous AS MATERIALIZED (
    SELECT set_config('synchronous_commit', 'on', true) FROM behind
    WHERE yes AND current_setting('synchronous_standby_names') <> '' AND current_setting('synchronous_commit') IN ('off', 'local', 'remote_write')
), flush AS MATERIALIZED (
    SELECT FROM ` + s.t.OwnerIdent() + ` WHERE shard = ` + shard + ` AND token = ` + token + ` AND (SELECT yes FROM behind) AND (SELECT count(*) FROM synchronous) >= 0 FOR KEY SHARE
), durable AS MATERIALIZED (
    SELECT NOT (SELECT yes FROM behind) OR EXISTS (SELECT FROM flush) AS ok
)
SELECT batch.*, (SELECT ok FROM durable) FROM (` + read + `) AS batch ORDER BY batch.id`
}
