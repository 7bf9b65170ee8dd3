package txn

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// ReadCommitted fetches the offsets [from, end) of one partition with
// read_committed and calls each for every committed data record, in offset
// order. It fetches by hand, so that it knows exactly when it has passed end
// whatever lies there (aborted batches, control records, offsets removed by
// compaction), which a consumer cannot tell; end is usually the last stable
// offset (kadm's ListCommittedOffsets). It retries leader moves and broker
// restarts, and gives up after 20 failed fetches in a row.
func ReadCommitted(ctx context.Context, cl *kgo.Client, topic string, partition int32, from, end int64, log *slog.Logger, each func(*kgo.Record)) error {
	adm := kadm.NewClient(cl)
	for offset, attempt := from, 0; offset < end; {
		td, err := adm.ListTopics(ctx, topic)
		if err != nil {
			return fmt.Errorf("metadata of %q: %w", topic, err)
		}
		t, ok := td[topic]
		if !ok || t.Err != nil {
			return fmt.Errorf("metadata of %q: %v", topic, t.Err)
		}
		pd, ok := t.Partitions[partition]
		if !ok {
			return fmt.Errorf("topic %q has no partition %d", topic, partition)
		}

		req := kmsg.NewPtrFetchRequest()
		req.ReplicaID = -1
		req.MaxWaitMillis = 100
		req.MaxBytes = 4 << 20
		req.IsolationLevel = 1 // read_committed
		rt := kmsg.NewFetchRequestTopic()
		rt.Topic = topic
		rt.TopicID = t.ID
		rp := kmsg.NewFetchRequestTopicPartition()
		rp.Partition = partition
		rp.FetchOffset = offset
		rp.PartitionMaxBytes = 2 << 20
		rp.CurrentLeaderEpoch = -1
		rp.LogStartOffset = -1
		rt.Partitions = append(rt.Partitions, rp)
		req.Topics = append(req.Topics, rt)

		resp, err := req.RequestWith(ctx, cl.Broker(int(pd.Leader)))
		if err == nil && (len(resp.Topics) != 1 || len(resp.Topics[0].Partitions) != 1) {
			err = fmt.Errorf("unexpected fetch response shape")
		}
		if err == nil {
			err = kerr.ErrorForCode(resp.ErrorCode)
		}
		var part *kmsg.FetchResponseTopicPartition
		if err == nil {
			part = &resp.Topics[0].Partitions[0]
			err = kerr.ErrorForCode(part.ErrorCode)
		}
		if err != nil {
			if attempt++; attempt > 20 || ctx.Err() != nil {
				return fmt.Errorf("fetch %s/%d@%d: %w", topic, partition, offset, err)
			}
			// A leader move or a broker restart: look the leader up again.
			log.Warn("fetch failed, retrying", "topic", topic, "partition", partition, "offset", offset, "err", err)
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(time.Duration(attempt) * 100 * time.Millisecond):
			}
			continue
		}
		fp, next := kgo.ProcessFetchPartition(kgo.ProcessFetchPartitionOpts{
			Offset:         offset,
			IsolationLevel: kgo.ReadCommitted(),
			Topic:          topic,
			Partition:      partition,
		}, part, kgo.DefaultDecompressor(), nil)
		if fp.Err != nil {
			return fmt.Errorf("decode %s/%d@%d: %w", topic, partition, offset, fp.Err)
		}
		for _, r := range fp.Records {
			if r.Offset < end && !r.Attrs.IsControl() {
				each(r)
			}
		}
		if next <= offset {
			// Nothing was returned below the last stable offset yet
			// (replication lag on a follower-led partition); wait a bit.
			if attempt++; attempt > 100 {
				return fmt.Errorf("fetch %s/%d: stuck at offset %d below end %d", topic, partition, offset, end)
			}
			select {
			case <-ctx.Done():
				return ctx.Err()
			case <-time.After(50 * time.Millisecond):
			}
			continue
		}
		offset, attempt = next, 0
	}
	return nil
}
