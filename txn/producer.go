// Package txn is the Kafka side of outbox-relay, on franz-go: one
// transactional producer per shard, the checkpoint record written inside
// every transaction, the recovery read of that checkpoint, and the error
// classes a batch can end in.
package txn

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"log/slog"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"
)

// Config is what every producer of one relay shares.
type Config struct {
	// Brokers are the seed brokers, host:port.
	Brokers []string
	// RelayName prefixes the transactional ids: shard s writes as
	// "<RelayName>-<s>".
	RelayName string
	// CheckpointTopic is the compacted topic with one partition per shard.
	CheckpointTopic string
	// TransactionTimeout is Kafka's transaction.timeout.ms: the broker aborts
	// a transaction left open longer than this by a dead producer.
	TransactionTimeout time.Duration
	// DeliveryTimeout is Kafka's delivery.timeout.ms: how long a record may be
	// retried before its batch fails (and the transaction aborts).
	DeliveryTimeout time.Duration
	// ClientID is Kafka's client.id.
	ClientID string
	// Extra are further franz-go options: TLS and SASL, dialers.
	Extra []kgo.Opt
	// Logger receives franz-go's warnings and errors and the producer's own
	// state changes.
	Logger *slog.Logger
	// BeforeCommit, if set, is called after every record of a batch was
	// acknowledged and before EndTxn: a failpoint for tests. A non-nil error
	// leaves the transaction open and is returned from Publish.
	BeforeCommit func(ctx context.Context, shard int32, ids []int64) error
}

// TransactionalID is the transactional id of shard s.
func (c Config) TransactionalID(shard int32) string {
	return c.RelayName + "-" + strconv.Itoa(int(shard))
}

// Record is one outbox row on its way to Kafka.
type Record struct {
	ID        int64 // the outbox row id, sent as header "outbox-id"
	Topic     string
	Key       []byte
	Value     []byte // nil: a tombstone
	Headers   []kgo.RecordHeader
	Partition int32 // -1: Kafka's murmur2 on the key
}

// Size is the record's payload in bytes, for metrics.
func (r Record) Size() int {
	n := len(r.Key) + len(r.Value)
	for _, h := range r.Headers {
		n += len(h.Key) + len(h.Value)
	}
	return n
}

// Producer is the transactional producer of one shard. Only one Producer of a
// shard can write at a time: creating one fences every earlier one.
type Producer struct {
	cfg   Config
	shard int32
	cl    *kgo.Client
	adm   *kadm.Client
	log   *slog.Logger

	mu         sync.Mutex
	partitions map[string]int // partition counts, for explicit partitions
	epoch      int16
	producerID int64
}

// NewProducer creates shard's producer and runs InitProducerID with the
// shard's transactional id (recovery step 1). That fences every earlier
// producer of the shard, whose next Kafka call fails, and completes or aborts
// the transaction it left open, so that afterwards the checkpoint partition
// holds no open transaction of this shard.
func NewProducer(ctx context.Context, cfg Config, shard int32) (*Producer, error) {
	log := cfg.Logger.With("shard", shard, "transactional_id", cfg.TransactionalID(shard))
	opts := append([]kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.TransactionalID(cfg.TransactionalID(shard)),
		kgo.TransactionTimeout(cfg.TransactionTimeout),
		kgo.RequiredAcks(kgo.AllISRAcks()),
		kgo.RecordPartitioner(rowPartitioner{}),
		kgo.ProducerLinger(0),
		kgo.WithLogger(kgoLogger{log}),
	}, cfg.Extra...)
	if cfg.DeliveryTimeout > 0 {
		opts = append(opts, kgo.RecordDeliveryTimeout(cfg.DeliveryTimeout))
	}
	if cfg.ClientID != "" {
		opts = append(opts, kgo.ClientID(cfg.ClientID))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("producer of shard %d: %w", shard, err)
	}
	p := &Producer{cfg: cfg, shard: shard, cl: cl, adm: kadm.NewClient(cl), log: log, partitions: map[string]int{}}
	id, epoch, err := cl.ProducerID(ctx)
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("init producer id of %s: %w", cfg.TransactionalID(shard), classify(err))
	}
	p.producerID, p.epoch = id, epoch
	log.Info("producer initialized, earlier producers fenced", "producer_id", id, "epoch", epoch)
	return p, nil
}

// Epoch is the producer epoch InitProducerID gave this producer.
func (p *Producer) Epoch() int16 { return p.epoch }

// Close releases the client without ending an open transaction: the broker
// aborts it after the transaction timeout, or the next producer of the shard
// aborts it at once.
func (p *Producer) Close() { p.cl.Close() }

// Abort aborts the open transaction, if any, for a clean shutdown.
func (p *Producer) Abort(ctx context.Context) error {
	if err := p.cl.AbortBufferedRecords(ctx); err != nil {
		return fmt.Errorf("abort buffered records: %w", err)
	}
	if err := p.cl.EndTransaction(ctx, kgo.TryAbort); err != nil {
		return fmt.Errorf("abort transaction: %w", classify(err))
	}
	return nil
}

// Publish writes one batch of the shard in one Kafka transaction: every
// record (header "outbox-id" = row id, then the row's headers), plus the
// checkpoint record listing cp.IDs to the shard's checkpoint partition.
//
// I1: the caller marks the rows published only after Publish returns nil:
// then, and only then, a committed transaction holds every record.
// I2: cp.IDs must list every row of the batch and every earlier row whose
// database mark is not yet durable, so a crash after the commit and before
// the mark is repaired by recovery from the checkpoint.
//
// Errors: ErrFenced (stop), ErrCommitUnknown (close, recover), ErrFatal,
// *RecordErrors (records Kafka refused; transaction aborted), or ErrAborted
// (nothing committed; retry).
func (p *Producer) Publish(ctx context.Context, recs []Record, cp Checkpoint) error {
	if bad := p.checkPartitions(ctx, recs); len(bad) > 0 {
		return &RecordErrors{Records: bad}
	}
	cpValue, err := json.Marshal(cp)
	if err != nil {
		return fmt.Errorf("encode checkpoint: %w", err)
	}
	if err := p.cl.BeginTransaction(); err != nil {
		return fmt.Errorf("begin transaction: %w", classify(err))
	}

	var (
		mu         sync.Mutex
		recordErrs []*RecordError
		otherErr   error
	)
	promise := func(id int64) func(*kgo.Record, error) {
		return func(_ *kgo.Record, err error) {
			if err == nil {
				return
			}
			mu.Lock()
			defer mu.Unlock()
			if isRecordFatal(err) && id >= 0 {
				recordErrs = append(recordErrs, &RecordError{ID: id, Err: err})
			} else if otherErr == nil {
				otherErr = err
			}
		}
	}
	for _, r := range recs {
		kr := &kgo.Record{
			Topic:     r.Topic,
			Key:       r.Key,
			Value:     r.Value,
			Partition: r.Partition,
			Headers: append([]kgo.RecordHeader{{Key: HeaderOutboxID, Value: strconv.AppendInt(nil, r.ID, 10)}},
				r.Headers...),
		}
		p.cl.Produce(ctx, kr, promise(r.ID))
	}
	p.cl.Produce(ctx, &kgo.Record{
		Topic:     p.cfg.CheckpointTopic,
		Partition: p.shard,
		Key:       []byte(p.cfg.TransactionalID(p.shard)),
		Value:     cpValue,
	}, promise(-1))

	// Flush waits for every produce answer (kgo retries lost acks itself;
	// the idempotent sequence numbers make the broker drop the duplicate,
	// which is how a lost produce acknowledgement cannot duplicate a row).
	flushErr := p.cl.Flush(ctx)
	mu.Lock()
	rerrs, oerr := recordErrs, otherErr
	mu.Unlock()
	if flushErr != nil || rerrs != nil || oerr != nil {
		abortErr := p.abortAfterFailure(ctx)
		switch {
		case oerr != nil && (isFenced(oerr) || isRelayFatal(oerr)):
			return fmt.Errorf("produce: %w", classify(oerr))
		case abortErr != nil && isFenced(abortErr):
			return fmt.Errorf("abort after failed produce: %w", classify(abortErr))
		case rerrs != nil:
			return &RecordErrors{Records: rerrs}
		case oerr != nil:
			return fmt.Errorf("produce: %w", classify(oerr))
		case abortErr != nil:
			return fmt.Errorf("abort after failed flush: %w", classify(abortErr))
		default:
			return fmt.Errorf("flush: %w", classify(flushErr))
		}
	}

	if p.cfg.BeforeCommit != nil {
		if err := p.cfg.BeforeCommit(ctx, p.shard, cp.IDs); err != nil {
			return err
		}
	}

	// The commit. Its answer decides what the caller may do:
	err = p.cl.EndTransaction(ctx, kgo.TryCommit)
	switch {
	case err == nil:
		return nil
	case isFenced(err):
		// A newer producer of this shard ran InitProducerID: it aborted
		// this transaction (or it had committed before, and the new owner
		// reads that from the checkpoint). Either way, not ours to mark.
		return fmt.Errorf("commit: %w", classify(err))
	case isRelayFatal(err):
		return fmt.Errorf("commit: %w", classify(err))
	default:
		// A lost EndTxn answer, a transport error, a cancelled context,
		// OPERATION_NOT_ATTEMPTED, TRANSACTION_ABORTABLE: the caller must
		// not mark, and must not guess. It closes this producer and
		// recovers: the next producer's InitProducerID settles the
		// transaction and the checkpoint says whether these ids committed.
		return fmt.Errorf("commit: %w: %w", ErrCommitUnknown, err)
	}
}

// abortAfterFailure drops what is buffered and aborts the transaction after a
// failed produce or flush.
func (p *Producer) abortAfterFailure(ctx context.Context) error {
	if err := p.cl.AbortBufferedRecords(ctx); err != nil {
		return err
	}
	return p.cl.EndTransaction(ctx, kgo.TryAbort)
}

// HeaderOutboxID is the record header holding the decimal outbox row id.
const HeaderOutboxID = "outbox-id"

// checkPartitions refuses records whose explicit partition the topic does
// not have: franz-go would fail them all the same, but with an error that
// does not name the cause.
func (p *Producer) checkPartitions(ctx context.Context, recs []Record) []*RecordError {
	var bad []*RecordError
	for _, r := range recs {
		if r.Partition < 0 {
			continue
		}
		n, err := p.partitionCount(ctx, r.Topic)
		if err != nil {
			continue // let the produce report it
		}
		if int(r.Partition) >= n {
			bad = append(bad, &RecordError{ID: r.ID, Err: fmt.Errorf(
				"partition %d does not exist: topic %q has %d partitions; fix the row's partition or add partitions", r.Partition, r.Topic, n)})
		}
	}
	return bad
}

func (p *Producer) partitionCount(ctx context.Context, topic string) (int, error) {
	p.mu.Lock()
	n, ok := p.partitions[topic]
	p.mu.Unlock()
	if ok {
		return n, nil
	}
	td, err := p.adm.ListTopics(ctx, topic)
	if err != nil {
		return 0, err
	}
	t, ok := td[topic]
	if !ok || t.Err != nil {
		return 0, fmt.Errorf("topic %q metadata unavailable", topic)
	}
	n = len(t.Partitions)
	p.mu.Lock()
	p.partitions[topic] = n
	p.mu.Unlock()
	return n, nil
}

// rowPartitioner places a record on its explicit partition when it has one
// (Partition >= 0), else by Kafka's default murmur2 hash of the key, as the
// Java client does. Keyless records are spread by a hash of their outbox id.
// I4: a key always maps to the same partition of its topic.
type rowPartitioner struct{}

func (rowPartitioner) ForTopic(string) kgo.TopicPartitioner {
	return rowTopicPartitioner{hash: kgo.StickyKeyPartitioner(nil).ForTopic("")}
}

type rowTopicPartitioner struct{ hash kgo.TopicPartitioner }

func (rowTopicPartitioner) RequiresConsistency(*kgo.Record) bool { return true }
func (rowTopicPartitioner) OnNewBatch()                          {}

func (t rowTopicPartitioner) Partition(r *kgo.Record, n int) int {
	if r.Partition >= 0 {
		return int(r.Partition)
	}
	if r.Key != nil {
		return t.hash.Partition(r, n)
	}
	var id [8]byte
	if len(r.Headers) > 0 {
		v, _ := strconv.ParseInt(string(r.Headers[0].Value), 10, 64)
		binary.BigEndian.PutUint64(id[:], uint64(v))
	}
	return t.hash.Partition(&kgo.Record{Key: id[:]}, n)
}

// kgoLogger sends franz-go's log lines to slog.
type kgoLogger struct{ l *slog.Logger }

func (k kgoLogger) Level() kgo.LogLevel { return kgo.LogLevelWarn }
func (k kgoLogger) Log(level kgo.LogLevel, msg string, kv ...any) {
	lvl := slog.LevelInfo
	switch level {
	case kgo.LogLevelError:
		lvl = slog.LevelError
	case kgo.LogLevelWarn:
		lvl = slog.LevelWarn
	case kgo.LogLevelDebug:
		lvl = slog.LevelDebug
	}
	k.l.Log(context.Background(), lvl, "kafka: "+msg, kv...)
}
