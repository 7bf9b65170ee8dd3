package txn

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
)

// ErrClusterMismatch: a setting of the relay does not fit the Kafka
// cluster (a transaction timeout above the brokers' maximum, a checkpoint
// topic that is not compacted or has too few partitions). The error says
// which and the fix; it is not a connection problem.
var ErrClusterMismatch = errors.New("the relay's settings do not fit the Kafka cluster")

// mismatch is an ErrClusterMismatch with its own text.
type mismatch struct{ msg string }

func (m mismatch) Error() string        { return m.msg }
func (m mismatch) Is(target error) bool { return target == ErrClusterMismatch }

func mismatchf(format string, a ...any) error { return mismatch{fmt.Sprintf(format, a...)} }

// checkTransactionTimeout refuses a transaction.timeout.ms above the
// brokers' transaction.max.timeout.ms (the smallest of the brokers', as
// any may coordinate a transactional id): every InitProducerID would fail
// with INVALID_TRANSACTION_TIMEOUT, an owner at its first shard and a
// standby only when it takes one over. When the brokers' value cannot be
// read (no DESCRIBE_CONFIGS on the cluster), it warns and goes on.
func checkTransactionTimeout(ctx context.Context, adm *kadm.Client, s Settings, log *slog.Logger) error {
	if !s.Mode.Transactional() || s.TransactionTimeout <= 0 {
		return nil
	}
	brokers, err := adm.ListBrokers(ctx)
	if err != nil {
		return fmt.Errorf("list brokers: %w", err)
	}
	rcs, err := adm.DescribeBrokerConfigs(ctx, brokers.NodeIDs()...)
	var least time.Duration
	var at string
	for _, rc := range rcs {
		if rc.Err != nil {
			continue
		}
		for _, c := range rc.Configs {
			if c.Key != "transaction.max.timeout.ms" || c.Value == nil {
				continue
			}
			if n, perr := strconv.ParseInt(*c.Value, 10, 64); perr == nil && (least == 0 || time.Duration(n)*time.Millisecond < least) {
				least, at = time.Duration(n)*time.Millisecond, rc.Name
			}
		}
	}
	if least == 0 {
		log.Warn("could not read the brokers' transaction.max.timeout.ms (DescribeConfigs on the brokers: grant DESCRIBE_CONFIGS on the cluster to see it checked at start); if OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS is above it, every transaction fails with INVALID_TRANSACTION_TIMEOUT",
			"transaction_timeout_ms", s.TransactionTimeout.Milliseconds(), "err", err)
		return nil
	}
	if s.TransactionTimeout > least {
		return mismatchf("OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS is %d, above the brokers' transaction.max.timeout.ms of %d (broker id %s): every transaction would fail with INVALID_TRANSACTION_TIMEOUT; lower it to at most %d, or raise transaction.max.timeout.ms on every broker",
			s.TransactionTimeout.Milliseconds(), least.Milliseconds(), at, least.Milliseconds())
	}
	return nil
}

// checkCheckpointPolicy refuses an existing checkpoint topic whose
// segments Kafka deletes (cleanup.policy delete, or compact,delete, with a
// finite retention.ms or retention.bytes): the last checkpoint of a shard
// that has not committed for that long would be deleted with them, and
// recovery could no longer tell which of its batches committed, so rows
// committed but not marked would be published again. The relay creates the
// topic compacted; this catches one made by hand or by auto-creation. When
// the topic's configuration cannot be read, it warns and goes on.
func checkCheckpointPolicy(ctx context.Context, adm *kadm.Client, topic string, log *slog.Logger) error {
	rcs, err := adm.DescribeTopicConfigs(ctx, topic)
	if err == nil {
		var rc kadm.ResourceConfig
		if rc, err = rcs.On(topic, nil); err == nil {
			err = rc.Err
		}
		if err == nil {
			vals := map[string]string{"cleanup.policy": "delete", "retention.ms": "604800000", "retention.bytes": "-1"}
			for _, c := range rc.Configs {
				if _, ok := vals[c.Key]; ok && c.Value != nil {
					vals[c.Key] = *c.Value
				}
			}
			policies := strings.Split(strings.ReplaceAll(vals["cleanup.policy"], " ", ""), ",")
			deletes := slices.Contains(policies, "delete")
			forever := vals["retention.ms"] == "-1" && vals["retention.bytes"] == "-1"
			switch {
			case deletes && !forever:
				return mismatchf("checkpoint topic %q has cleanup.policy=%s with retention.ms=%s and retention.bytes=%s: Kafka deletes old segments, and with them the last checkpoint of a shard that has not committed since, so recovery could not repair that shard's unmarked batches (they would be published again). "+
					"Make it compacted only: kafka-configs.sh --alter --entity-type topics --entity-name %s --add-config cleanup.policy=compact (the relay creates its checkpoint topic so when it is missing)",
					topic, vals["cleanup.policy"], vals["retention.ms"], vals["retention.bytes"], topic)
			case !slices.Contains(policies, "compact"):
				log.Warn("the checkpoint topic is not compacted: it keeps every checkpoint forever (retention.ms and retention.bytes are -1); cleanup.policy=compact keeps only the last of each shard",
					"topic", topic, "cleanup_policy", vals["cleanup.policy"])
			}
			return nil
		}
	}
	log.Warn("could not read the checkpoint topic's cleanup.policy (DESCRIBE_CONFIGS on the topic): it must be compact, never delete", "topic", topic, "err", err)
	return nil
}
