package relay

import (
	"context"
	"errors"
	"fmt"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/txn"
)

// ErrShardsChanged: OUTBOX_SHARDS differs from the shard count recorded for
// the table. Run Reshard (`outbox-relay reshard`) with every relay stopped.
var ErrShardsChanged = errors.New("shard count changed")

// ErrRelaysRunning: Reshard found relays of the table running.
var ErrRelaysRunning = errors.New("relays of this table are running")

// Reshard changes the table's shard count to cfg.Shards, safely: with no
// relay of the table running (it holds the membership lock exclusively, so
// none can start meanwhile), it recovers every shard of the old layout as a
// new owner would (InitProducerID fences and settles each old transactional
// id; the ids of its latest checkpoint are marked published), grows the
// checkpoint topic if needed, and records the new count. Rows then map to
// the new shards with nothing committed left unmarked, so none is published
// twice. It returns the old count.
func (r *Relay) Reshard(ctx context.Context) (int, error) {
	defer r.pool.Close()
	key := r.store.Table().String()
	conn, err := pgx.ConnectConfig(ctx, r.pool.Config().ConnConfig)
	if err != nil {
		return 0, fmt.Errorf("reshard: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var alone bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, migrations.LockKey+2, key).Scan(&alone); err != nil {
		return 0, fmt.Errorf("reshard: membership lock: %w", err)
	}
	if !alone {
		return 0, fmt.Errorf("reshard: %w: stop every relay of %s first (SIGTERM: a clean stop marks what it committed)", ErrRelaysRunning, r.store.Table())
	}
	if r.incarnation, err = r.store.Incarnation(ctx); err != nil {
		return 0, err
	}
	old, err := r.store.Shards(ctx, r.cfg.Shards)
	if err != nil {
		return 0, err
	}
	if old == r.cfg.Shards {
		return old, nil
	}
	if r.mode.Transactional() {
		for s := range int32(old) {
			log := r.log.With("shard", s)
			p, err := r.recoverShard(ctx, s, log)
			if err != nil {
				return old, fmt.Errorf("reshard: recover old shard %d: %w", s, err)
			}
			p.Close()
		}
		if err := txn.GrowCheckpointTopic(ctx, r.tcfg, r.cfg.Shards); err != nil {
			return old, fmt.Errorf("reshard: %w", err)
		}
	}
	if err := r.store.SetShards(ctx, r.cfg.Shards); err != nil {
		return old, err
	}
	r.log.Info("resharded", "from", old, "to", r.cfg.Shards)
	return old, nil
}
