package txn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
)

// CheckpointVersion is the format version of checkpoint records this relay
// writes. Version 2 carries the recovery window (the rows of the last
// batches, each with its fingerprint); version 1 listed the ids of the last
// batch only, and is still read.
const CheckpointVersion = 2

// ErrCheckpointFormat: the shard's latest checkpoint is in a format this
// relay does not read (written by a newer relay). Applying it blindly could
// mark rows never published, so the relay stops.
var ErrCheckpointFormat = errors.New("checkpoint format not understood")

// ErrCheckpointForeign: the newest committed record of the shard's
// checkpoint partition is not a checkpoint (a tombstone written to "reset"
// the key, a record of another program). Recovery cannot know what the shard
// committed, so the shard stops instead of guessing or retrying forever.
var ErrCheckpointForeign = errors.New("checkpoint partition holds a record that is not a checkpoint")

// Checkpoint is the record written to partition s of the checkpoint topic
// inside every transaction of shard s. Its window lists the rows this
// transaction and the shard's previous ones hold, whose database mark may be
// missing or not durable (I2, I5).
type Checkpoint struct {
	Version     int    `json:"v"`
	Relay       string `json:"relay"`
	Shard       int32  `json:"shard"`
	Table       string `json:"table"`
	Incarnation string `json:"incarnation"` // identity of the outbox table
	// SystemID and Timeline are the database's when the transaction was
	// written (outbox.History): recovery says when they changed, a
	// fail-over or a restore, and reports the window's rows the database
	// no longer has. Empty in checkpoints of relays before they were
	// recorded.
	SystemID string `json:"system_id,omitempty"`
	Timeline int32  `json:"timeline,omitempty"`
	// Source is "replication" for a checkpoint of OUTBOX_SOURCE=replication
	// (empty: poll). LSN is then the end LSN of the last PostgreSQL
	// transaction the Kafka transaction holds (or an idle position);
	// RowIndex, when not 0, says it holds only that transaction's first
	// RowIndex rows, and CommitLSN is the start of its commit record.
	// Handover is the WAL position up to which rows may have been
	// published by the poll read before the switch (their marks say so).
	Source    string `json:"source,omitempty"`
	LSN       string `json:"lsn,omitempty"`
	CommitLSN string `json:"commit_lsn,omitempty"`
	RowIndex  int    `json:"row_index,omitempty"`
	Handover  string `json:"handover_lsn,omitempty"`
	// SwitchedFrom is "replication" in the checkpoint-only transaction of
	// the poll read that took the shard over from the replication source;
	// Handover is then the WAL position up to which that source published
	// (every row committed up to it is marked; none after it was published).
	SwitchedFrom string    `json:"switched_from,omitempty"`
	IDs          []int64   `json:"ids,omitempty"`    // version 1: the last batch's ids
	Window       []byte    `json:"window,omitempty"` // version 2: the recovery window, see Window
	Written      time.Time `json:"written"`
}

// EnsureCheckpointTopic creates the checkpoint topic (compacted, one
// partition per shard) if it does not exist, and checks that an existing one
// has a partition for every shard.
func EnsureCheckpointTopic(ctx context.Context, cfg Config, shards int) error {
	return checkpointTopic(ctx, cfg, shards, false)
}

// GrowCheckpointTopic is EnsureCheckpointTopic that adds partitions to an
// existing topic until it has one per shard (for a reshard to more shards).
func GrowCheckpointTopic(ctx context.Context, cfg Config, shards int) error {
	return checkpointTopic(ctx, cfg, shards, true)
}

func checkpointTopic(ctx context.Context, cfg Config, shards int, grow bool) error {
	opts := append([]kgo.Opt{kgo.SeedBrokers(cfg.Brokers...), kgo.WithLogger(KafkaLogger(cfg.Logger, kgo.LogLevelWarn))}, cfg.Settings.clientOpts()...)
	cl, err := kgo.NewClient(append(opts, cfg.Extra...)...)
	if err != nil {
		return fmt.Errorf("checkpoint topic: %w", err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	log := cfg.Logger
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := checkTransactionTimeout(ctx, adm, cfg.Settings, log); err != nil {
		return err
	}
	topics, err := adm.ListTopics(ctx, cfg.CheckpointTopic)
	if err != nil {
		return fmt.Errorf("checkpoint topic %q: list: %w", cfg.CheckpointTopic, err)
	}
	if t, ok := topics[cfg.CheckpointTopic]; ok && t.Err == nil {
		n := len(t.Partitions)
		if err := checkCheckpointPolicy(ctx, adm, cfg.CheckpointTopic, log); err != nil {
			return err
		}
		switch {
		case n >= shards:
			return nil
		case !grow:
			return mismatchf("checkpoint topic %q has %d partitions but OUTBOX_SHARDS is %d: run `outbox-relay reshard` with the new OUTBOX_SHARDS (it adds them)", cfg.CheckpointTopic, n, shards)
		}
		resp, err := adm.UpdatePartitions(ctx, shards, cfg.CheckpointTopic)
		if err == nil {
			err = resp.Error()
		}
		if err != nil {
			return fmt.Errorf("grow checkpoint topic %q to %d partitions: %w", cfg.CheckpointTopic, shards, err)
		}
		return nil
	}
	brokers, err := adm.ListBrokers(ctx)
	if err != nil {
		return fmt.Errorf("checkpoint topic %q: list brokers: %w", cfg.CheckpointTopic, err)
	}
	rf := int16(min(3, len(brokers)))
	resp, err := adm.CreateTopic(ctx, int32(shards), rf, map[string]*string{
		"cleanup.policy": kadm.StringPtr("compact"),
	}, cfg.CheckpointTopic)
	if err != nil && !errors.Is(err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("create checkpoint topic %q: %w", cfg.CheckpointTopic, err)
	}
	if resp.Err != nil && !errors.Is(resp.Err, kerr.TopicAlreadyExists) {
		return fmt.Errorf("create checkpoint topic %q: %w", cfg.CheckpointTopic, resp.Err)
	}
	return nil
}

// ReadCheckpoint returns the latest committed checkpoint of the producer's
// shard, or nil when the shard has never committed (recovery step 2). A
// newest record that is not a checkpoint is ErrCheckpointForeign; one in a
// newer format is ErrCheckpointFormat.
//
// It reads with read_committed up to the last stable offset. Call it only
// after NewProducer: InitProducerID has then settled every transaction of the
// shard, so nothing the shard wrote is still in doubt and the last stable
// offset is the end of the partition.
func (p *Producer) ReadCheckpoint(ctx context.Context) (*Checkpoint, error) {
	return readLatest(ctx, p.cl, p.adm, p.cfg.CheckpointTopic, p.shard, p.log)
}

// LatestCheckpoint reads, without fencing anyone, the latest committed
// checkpoint of shard in topic with a plain client (no transactional id),
// or nil when the shard has never committed: what `outbox-relay status`
// shows. A transaction still open is not seen (read_committed, up to the
// last stable offset), so the answer may be one transaction behind the
// shard's owner; recovery uses ReadCheckpoint after fencing instead.
func LatestCheckpoint(ctx context.Context, cl *kgo.Client, topic string, shard int32, log *slog.Logger) (*Checkpoint, error) {
	return readLatest(ctx, cl, kadm.NewClient(cl), topic, shard, log)
}

func readLatest(ctx context.Context, cl *kgo.Client, adm *kadm.Client, topic string, shard int32, log *slog.Logger) (*Checkpoint, error) {
	starts, err := adm.ListStartOffsets(ctx, topic)
	if err != nil {
		return nil, fmt.Errorf("checkpoint start offset: %w", err)
	}
	ends, err := adm.ListCommittedOffsets(ctx, topic)
	if err != nil {
		return nil, fmt.Errorf("checkpoint last stable offset: %w", err)
	}
	so, ok1 := starts.Lookup(topic, shard)
	eo, ok2 := ends.Lookup(topic, shard)
	if !ok1 || !ok2 || so.Err != nil || eo.Err != nil {
		return nil, fmt.Errorf("checkpoint topic %q has no partition %d (errors: %v, %v)", topic, shard, so.Err, eo.Err)
	}
	start, end := so.Offset, eo.Offset
	// The newest checkpoint is usually two offsets below the end (the
	// record, then the commit marker); aborted transactions push it further
	// back. Search backwards in growing windows.
	for window := int64(16); ; window *= 4 {
		from := max(start, end-window)
		var rec *kgo.Record
		err := ReadCommitted(ctx, cl, topic, shard, from, end, log, func(r *kgo.Record) { rec = r })
		if err != nil {
			return nil, err
		}
		if rec != nil {
			var cp Checkpoint
			decodeErr := json.Unmarshal(rec.Value, &cp)
			if rec.Value != nil && decodeErr == nil && cp.Version > CheckpointVersion {
				return nil, fmt.Errorf("%w: checkpoint at %s/%d@%d has format version %d, this relay reads %d: upgrade the relay", ErrCheckpointFormat, topic, shard, rec.Offset, cp.Version, CheckpointVersion)
			}
			if rec.Value == nil || decodeErr != nil || cp.Version < 1 || cp.Relay == "" {
				what := "a record that does not decode as a checkpoint"
				if rec.Value == nil {
					what = "a tombstone (null value)"
				}
				return nil, fmt.Errorf("%w: the newest committed record of %s partition %d, at offset %d, is %s (key %q). "+
					"Only the relay's own transactions may write there: recovery cannot tell which rows this shard committed, so the shard stays stopped. "+
					"Way out: stop every relay of this table, set a new OUTBOX_CHECKPOINT_TOPIC (recorded with `outbox-relay reshard`); "+
					"the relay then starts with no checkpoint, so rows committed to Kafka but not yet marked in the table are published again once",
					ErrCheckpointForeign, topic, shard, rec.Offset, what, rec.Key)
			}
			return &cp, nil
		}
		if from == start {
			return nil, nil
		}
	}
}
