package relay

import (
	"context"
	"errors"
	"fmt"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
)

// ErrShardsChanged: OUTBOX_SHARDS differs from the shard count recorded for
// the table. Run Reshard (`outbox-relay reshard`) with every relay stopped.
var ErrShardsChanged = errors.New("shard count changed")

// ErrRelayNameChanged: OUTBOX_RELAY_NAME differs from the relay name
// recorded for the table. Run Reshard with every relay stopped to change it.
var ErrRelayNameChanged = errors.New("relay name changed")

// ErrCheckpointTopicChanged: OUTBOX_CHECKPOINT_TOPIC differs from the
// checkpoint topic recorded for the table. Run Reshard with every relay
// stopped to change it.
var ErrCheckpointTopicChanged = errors.New("checkpoint topic changed")

// ErrDeliveryChanged: OUTBOX_DELIVERY differs from the delivery mode
// recorded for the table. Change it with Reshard (`outbox-relay reshard`)
// with every relay stopped.
var ErrDeliveryChanged = errors.New("delivery mode changed")

// ErrRelaysRunning: Reshard found relays of the table running.
var ErrRelaysRunning = errors.New("relays of this table are running")

// identity is what this relay's configuration says every relay of the
// table shares.
func (r *Relay) identity() outbox.Identity {
	return outbox.Identity{Shards: r.cfg.Shards, RelayName: r.cfg.RelayName, CheckpointTopic: r.cfg.CheckpointTopic, Delivery: string(r.mode)}
}

// checkIdentity compares the configuration with the shard count, relay name
// and checkpoint topic recorded for the table (recording them when none
// are), and explains a mismatch: relays that differ in any of them never
// fence each other and would publish rows twice.
func (r *Relay) checkIdentity(ctx context.Context) error {
	got, err := r.store.Identity(ctx, r.identity())
	if err != nil {
		return err
	}
	t := r.store.Table()
	switch {
	case got.Shards != r.cfg.Shards:
		return fmt.Errorf("%w: OUTBOX_SHARDS is %d but %s is split into %d shards; rows would move between shards, and a batch committed but not yet marked under %d shards could be published twice. "+
			"To change it: stop every relay of this table, then run `outbox-relay reshard` with OUTBOX_SHARDS=%d (it recovers every old shard, then records the new count)",
			ErrShardsChanged, r.cfg.Shards, t, got.Shards, got.Shards, r.cfg.Shards)
	case got.RelayName != r.cfg.RelayName:
		return fmt.Errorf("%w: OUTBOX_RELAY_NAME is %q but %s is relayed as %q; relays with two names have two sets of transactional ids that never fence each other, and would publish the same rows. "+
			"Set OUTBOX_RELAY_NAME=%q, or, to change it: stop every relay of this table, then run `outbox-relay reshard` with OUTBOX_RELAY_NAME=%q (it recovers every shard under the old name, then records the new one)",
			ErrRelayNameChanged, r.cfg.RelayName, t, got.RelayName, got.RelayName, r.cfg.RelayName)
	case got.CheckpointTopic != r.cfg.CheckpointTopic:
		return fmt.Errorf("%w: OUTBOX_CHECKPOINT_TOPIC is %q but %s records its checkpoints in %q; a relay reading another topic would not find the batches committed but not yet marked, and would publish them again. "+
			"Set OUTBOX_CHECKPOINT_TOPIC=%q, or, to change it: stop every relay of this table, then run `outbox-relay reshard` with OUTBOX_CHECKPOINT_TOPIC=%q (it recovers every shard from the old topic, then records the new one)",
			ErrCheckpointTopicChanged, r.cfg.CheckpointTopic, t, got.CheckpointTopic, got.CheckpointTopic, r.cfg.CheckpointTopic)
	case got.Delivery != string(r.mode):
		return fmt.Errorf("%w: OUTBOX_DELIVERY is %s but %s is relayed %s; a relay of another mode does not read the others' checkpoints and would publish again what they committed but did not mark. "+
			"Set OUTBOX_DELIVERY=%s, or, to change it: stop every relay of this table, then run `outbox-relay reshard` with OUTBOX_DELIVERY=%s (it recovers every shard from its checkpoints, then records the new mode)",
			ErrDeliveryChanged, r.mode, t, got.Delivery, got.Delivery, r.mode)
	}
	return nil
}

// as returns a relay like r with the recorded identity id: the one whose
// shards a reshard recovers. It recovers them as an exactly-once relay
// would, whatever OUTBOX_DELIVERY says now: a relay of the old layout may
// have committed batches in Kafka that only its checkpoints list, and only
// InitProducerID with its transactional id fences its zombies.
func (r *Relay) as(id outbox.Identity) *Relay {
	cfg := r.cfg
	cfg.Shards, cfg.RelayName, cfg.CheckpointTopic = id.Shards, id.RelayName, id.CheckpointTopic
	tcfg := r.tcfg
	tcfg.RelayName, tcfg.CheckpointTopic = id.RelayName, id.CheckpointTopic
	if !r.mode.Transactional() {
		settings := txn.DefaultSettings(txn.ExactlyOnce)
		settings.ClientID, settings.BatchMaxBytes, settings.MetricsPush = r.tcfg.Settings.ClientID, r.tcfg.Settings.BatchMaxBytes, r.tcfg.Settings.MetricsPush
		tcfg.Settings = settings
	}
	return &Relay{cfg: cfg, pool: r.pool, store: r.store, log: r.log.With("recorded_relay", id.RelayName), reg: r.reg, m: r.m,
		fail: r.fail, kopts: r.kopts, tcfg: tcfg, wake: r.wake, connCfg: r.connCfg, beforeConnect: r.beforeConnect, instance: r.instance,
		mode: txn.ExactlyOnce, incarnation: r.incarnation}
}

// Reshard changes the table's shard count, relay name or checkpoint topic
// to the configured ones, safely: with no relay of the table running (it
// holds the member lock exclusively, so none can start meanwhile, and a
// relay that waits for the lock checks the new values once it has it), it
// recovers every shard of the recorded layout under the recorded relay name
// and checkpoint topic, as a new owner would: it takes each shard's lease
// (a new token: a zombie of an old owner can mark nothing more), its
// InitProducerID fences and settles the old transactional id, and the ids
// of the latest checkpoint are marked published. Then it grows the
// configured checkpoint topic to one partition per shard (in every delivery
// mode, and also when nothing else changes, so that a topic left too small
// is repaired) and records the new values. Rows then map to the new shards
// with nothing committed left unmarked, so none is published twice. It
// returns the identity recorded before.
func (r *Relay) Reshard(ctx context.Context) (outbox.Identity, error) {
	key := r.store.Table().String()
	conn, err := connectDedicated(ctx, r.connCfg, r.beforeConnect)
	if err != nil {
		return outbox.Identity{}, fmt.Errorf("reshard: connect: %w", err)
	}
	defer conn.Close(context.WithoutCancel(ctx))
	var alone bool
	if err := conn.QueryRow(ctx, `SELECT pg_try_advisory_lock($1, hashtext($2))`, migrations.LockKey+2, key).Scan(&alone); err != nil {
		return outbox.Identity{}, fmt.Errorf("reshard: member lock: %w", err)
	}
	if !alone {
		return outbox.Identity{}, fmt.Errorf("reshard: %w: stop every relay of %s first (SIGTERM: a clean stop marks what it committed)", ErrRelaysRunning, r.store.Table())
	}
	if r.incarnation, err = r.store.Incarnation(ctx); err != nil {
		return outbox.Identity{}, err
	}
	old, err := r.store.Identity(ctx, r.identity())
	if err != nil {
		return outbox.Identity{}, err
	}
	changed := old != r.identity()
	if changed {
		rec := r.as(old)
		// In every delivery mode (a relay of the old layout may have
		// run exactly-once): the old checkpoint topic, created or grown
		// if an at-least-once relay never made it, holds what to mark.
		if err := txn.GrowCheckpointTopic(ctx, rec.tcfg, old.Shards); err != nil {
			return old, fmt.Errorf("reshard: old checkpoint topic: %w", err)
		}
		for s := range int32(old.Shards) {
			log := rec.log.With("shard", s)
			l, err := r.store.TakeLease(ctx, conn, s, r.instance+" (reshard)")
			if err != nil {
				return old, fmt.Errorf("reshard: %w", err)
			}
			wl := newLease(l, r.cfg.RebalanceInterval)
			p, err := rec.recoverShard(ctx, s, wl, log)
			if errors.Is(err, txn.ErrCheckpointForeign) && old.CheckpointTopic != r.cfg.CheckpointTopic {
				// The documented way out of a foreign record: a new
				// checkpoint topic. The old transactional id is fenced
				// (InitProducerID ran); what its last batches committed
				// but did not mark cannot be known and is published again.
				log.Warn("reshard: the old checkpoint partition holds a record that is not a checkpoint; moving to the new checkpoint topic: rows the old shard committed but did not mark, if any, are published again",
					"old_checkpoint_topic", old.CheckpointTopic, "new_checkpoint_topic", r.cfg.CheckpointTopic, "err", err)
				continue
			}
			if err != nil {
				return old, fmt.Errorf("reshard: recover old shard %d (relay name %q, checkpoint topic %q): %w", s, old.RelayName, old.CheckpointTopic, err)
			}
			p.Close()
		}
	}
	if err := txn.GrowCheckpointTopic(ctx, r.tcfg, r.cfg.Shards); err != nil {
		return old, fmt.Errorf("reshard: %w", err)
	}
	// The index serving the new count's shard filter, built before the
	// count is recorded (a failed build records nothing: run reshard
	// again), and also when nothing changes, which repairs a missing one.
	if err := r.buildShardIndex(ctx, conn); err != nil {
		return old, fmt.Errorf("reshard: %w", err)
	}
	if changed {
		if err := r.store.SetIdentity(ctx, r.identity()); err != nil {
			return old, err
		}
	}
	// The other counts' indexes serve no query now; a failed drop costs
	// the writers some index maintenance, nothing more.
	if dropped, err := outbox.DropShardIndexes(ctx, conn, r.store.Table(), r.cfg.Shards); err != nil {
		r.log.Warn("reshard: could not drop the shard index of the old shard count; drop it by hand (DROP INDEX CONCURRENTLY)", "err", err)
	} else if len(dropped) > 0 {
		r.log.Info("dropped shard indexes of other shard counts", "indexes", dropped)
	}
	r.log.Info("resharded", "from_shards", old.Shards, "to_shards", r.cfg.Shards,
		"from_relay_name", old.RelayName, "to_relay_name", r.cfg.RelayName,
		"from_checkpoint_topic", old.CheckpointTopic, "to_checkpoint_topic", r.cfg.CheckpointTopic)
	return old, nil
}
