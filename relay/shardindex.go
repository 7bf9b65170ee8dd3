package relay

import (
	"context"
	"time"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// buildShardIndex builds the index that serves the configured shard count's
// shard filter (outbox.ShardIndexSQL) if the table has no valid one; it
// does nothing for one shard.
func (r *Relay) buildShardIndex(ctx context.Context, db outbox.DDL) error {
	t := r.store.Table()
	start := time.Now()
	built, err := outbox.CreateShardIndex(ctx, db, t, r.cfg.Shards)
	if err != nil {
		return err
	}
	if built {
		r.log.Info("built the shard index", "index", t.ShardIndexName(r.cfg.Shards), "shards", r.cfg.Shards,
			"took", time.Since(start).Round(time.Millisecond).String())
	}
	return nil
}

// warnWithoutShardIndex logs a warning, and never fails, when the table is
// split into several shards and has no valid index serving their shard
// filter: the relay is correct without it, but each shard's read then walks
// every unpublished row of the table and tests each row's hash.
func (r *Relay) warnWithoutShardIndex(ctx context.Context) {
	if r.cfg.Shards <= 1 {
		return
	}
	t := r.store.Table()
	ok, err := outbox.HasShardIndex(ctx, r.pool, t, r.cfg.Shards)
	if err != nil {
		r.log.Warn("could not check for the shard index; carrying on", "index", t.ShardIndexName(r.cfg.Shards), "err", err)
		return
	}
	if !ok {
		r.log.Warn("no index serves the shard filter: each shard's read walks every unpublished row of the table (slower, still correct); "+
			"build it without blocking writers with `outbox-relay migrate up` (OUTBOX_SHARDS set as here; also `outbox-relay reshard` builds it) or by running the statement",
			"index", t.ShardIndexName(r.cfg.Shards), "shards", r.cfg.Shards, "statement", t.ShardIndexSQL(r.cfg.Shards))
	}
}
