package loadtest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"slices"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
)

// Scratch is what a bench run creates and removes: a schema holding a
// migrated outbox table, a data topic and a checkpoint topic, all under one
// random name.
type Scratch struct {
	// Name is outbox_bench_<8 hex digits>: the schema, and with dashes the
	// relay name.
	Name string
	// Table is the outbox table in the scratch schema.
	Table outbox.Table
	// Topic is the data topic; CheckpointTopic the relay's checkpoint topic.
	Topic           string
	CheckpointTopic string
	// Partitions is the data topic's partition count.
	Partitions int32

	pool   *pgxpool.Pool
	adm    *kadm.Client
	cl     *kgo.Client
	schema bool     // the schema was created
	topics []string // the topics created
}

// RelayName is the scratch relay's name (transactional id prefix).
func (s *Scratch) RelayName() string { return "outbox-bench-" + s.Name[len("outbox_bench_"):] }

// NewScratch creates the scratch schema (migrated with package migrations)
// on pool and the scratch topics on brokers (kopts: TLS, SASL). What it
// created is removed by Remove, which the caller must call even when
// NewScratch fails.
func NewScratch(ctx context.Context, pool *pgxpool.Pool, brokers []string, kopts []kgo.Opt, shards int, log *slog.Logger) (*Scratch, error) {
	var b [4]byte
	_, _ = rand.Read(b[:])
	id := hex.EncodeToString(b[:])
	s := &Scratch{
		Name:            "outbox_bench_" + id,
		Table:           outbox.Table{Schema: "outbox_bench_" + id, Name: "outbox"},
		Topic:           "outbox-bench-" + id,
		CheckpointTopic: "outbox-bench-" + id + "-checkpoints",
		Partitions:      3,
		pool:            pool,
	}
	if _, err := pool.Exec(ctx, `CREATE SCHEMA `+migrations.QuoteIdent(s.Table.Schema)); err != nil {
		return s, fmt.Errorf("create the scratch schema %s: %w: the bench needs the CREATE privilege on the database of OUTBOX_DATABASE_URL (GRANT CREATE ON DATABASE <db> TO <user>), or an OUTBOX_DATABASE_URL whose user has it", s.Table.Schema, err)
	}
	s.schema = true
	m, err := migrations.New(pool, s.Table.Schema, s.Table.Name)
	if err == nil {
		_, err = m.Up(ctx)
	}
	if err != nil {
		return s, fmt.Errorf("migrate the scratch table %s: %w", s.Table, err)
	}
	// As `migrate up` does for a table of several shards: the index that
	// serves the shard filter, for the relay's reads and the ceiling's.
	if _, err := outbox.CreateShardIndex(ctx, pool, s.Table, shards); err != nil {
		return s, fmt.Errorf("scratch table: %w", err)
	}

	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(brokers...)}, kopts...)...)
	if err != nil {
		return s, fmt.Errorf("Kafka client for OUTBOX_KAFKA_BROKERS: %w", err)
	}
	s.cl, s.adm = cl, kadm.NewClient(cl)
	bs, err := s.adm.ListBrokers(ctx)
	if err != nil {
		return s, fmt.Errorf("reach Kafka at OUTBOX_KAFKA_BROKERS %v: %w", brokers, err)
	}
	rf := int16(min(3, len(bs)))
	const fix = "the bench needs to create and delete topics (Kafka ACLs CREATE and DELETE on topics outbox-bench-*, or CREATE on the cluster): grant them to the OUTBOX_KAFKA_SASL_USERNAME user, or point OUTBOX_KAFKA_BROKERS at a cluster where it may"
	resp, err := s.adm.CreateTopic(ctx, s.Partitions, rf, nil, s.Topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		return s, fmt.Errorf("create the scratch topic %s: %w: %s", s.Topic, err, fix)
	}
	s.topics = append(s.topics, s.Topic)
	// The checkpoint topic as the relay creates it: compacted, one
	// partition per shard.
	s.topics = append(s.topics, s.CheckpointTopic) // removed even when half created
	if err := txn.EnsureCheckpointTopic(ctx, txn.Config{Brokers: brokers, CheckpointTopic: s.CheckpointTopic, Extra: kopts, Logger: log}, shards); err != nil {
		return s, fmt.Errorf("create the scratch checkpoint topic: %w: %s", err, fix)
	}
	return s, nil
}

// RoundTopic is the data topic of throughput round round (from 1): the
// scratch topic for the first, then a topic of its own for each later one,
// <Topic>-r<round>, created with the scratch topic's partitions, with the
// previous round's topic deleted (the scratch topic too). So no round drains into a topic that
// holds the records of the rounds before it: a broker that keeps records
// in memory (kfake) or on a small disk slows each later round otherwise.
// The topics it creates are removed by Remove.
func (s *Scratch) RoundTopic(ctx context.Context, round int) (string, error) {
	if round <= 1 {
		return s.Topic, nil
	}
	topic := fmt.Sprintf("%s-r%d", s.Topic, round)
	prev := s.Topic
	if round > 2 {
		prev = fmt.Sprintf("%s-r%d", s.Topic, round-1)
	}
	bs, err := s.adm.ListBrokers(ctx)
	if err != nil {
		return "", fmt.Errorf("round %d topic: %w", round, err)
	}
	s.topics = append(s.topics, topic) // removed even when half created
	resp, err := s.adm.CreateTopic(ctx, s.Partitions, int16(min(3, len(bs))), nil, topic)
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		return "", fmt.Errorf("create the round %d topic %s: %w", round, topic, err)
	}
	resps, err := s.adm.DeleteTopics(ctx, prev)
	if err == nil {
		err = resps[prev].Err
	}
	if err != nil && !errors.Is(err, kerr.UnknownTopicOrPartition) {
		return "", fmt.Errorf("delete the round %d topic %s: %w", round-1, prev, err)
	}
	s.topics = slices.DeleteFunc(s.topics, func(t string) bool { return t == prev })
	return topic, nil
}

// Remove drops the scratch schema and deletes the scratch topics, whatever
// part of them was created; it tries every step and returns every failure.
func (s *Scratch) Remove(ctx context.Context) error {
	var errs []error
	if s.schema {
		if _, err := s.pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+migrations.QuoteIdent(s.Table.Schema)+` CASCADE`); err != nil {
			errs = append(errs, fmt.Errorf("drop the scratch schema %s (drop it by hand: DROP SCHEMA %s CASCADE): %w", s.Table.Schema, s.Table.Schema, err))
		} else {
			s.schema = false
		}
	}
	if len(s.topics) > 0 {
		resps, err := s.adm.DeleteTopics(ctx, s.topics...)
		if err == nil {
			for _, r := range resps.Sorted() {
				if r.Err != nil && !errors.Is(r.Err, kerr.UnknownTopicOrPartition) {
					err = errors.Join(err, fmt.Errorf("%s: %w", r.Topic, r.Err))
				}
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("delete the scratch topics %v (delete them by hand): %w", s.topics, err))
		} else {
			s.topics = nil
		}
	}
	s.Close()
	return errors.Join(errs...)
}

// Close closes the Kafka client; Remove calls it. Call it instead of Remove
// to keep the scratch objects (-keep).
func (s *Scratch) Close() {
	if s.cl != nil {
		s.cl.Close()
	}
}
