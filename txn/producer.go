// Package txn is the Kafka side of outbox-relay, on franz-go: one
// transactional producer per shard, the checkpoint record written inside
// every transaction, the recovery read of that checkpoint, and the error
// classes a batch can end in.
package txn

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
	"go.opentelemetry.io/otel/trace"
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
	// Settings are the producer settings and the delivery mode.
	Settings Settings
	// Extra are further franz-go options: TLS and SASL, dialers.
	Extra []kgo.Opt
	// CreateTopics lets the producer create a topic that a record names and
	// the cluster does not have (after one metadata refresh, and after the
	// brokers' own auto-creation, which every metadata request asks for),
	// with CreateTopicPartitions partitions and CreateTopicReplicationFactor
	// replicas (-1: the brokers' defaults). Off, the records of a missing
	// topic are refused before anything is produced.
	CreateTopics                 bool
	CreateTopicPartitions        int32
	CreateTopicReplicationFactor int16
	// Logger receives franz-go's warnings and errors and the producer's own
	// state changes.
	Logger *slog.Logger
	// BeforeCommit, if set, is called after every record of a batch was
	// acknowledged and before EndTxn: a failpoint for tests. A non-nil error
	// leaves the transaction open and is returned from Publish.
	BeforeCommit func(ctx context.Context, shard int32, ids []int64) error
	// Tracer, when not nil, records one span per Kafka transaction
	// (Publish) or, outside exactly-once, per batch sent (Send), linked
	// to the span of every record's writer (its traceparent header; see
	// span.go). Nil: tracing is off and costs nothing. Records are sent
	// as they are either way: their headers are the row's.
	Tracer trace.Tracer
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
	Partition int32     // -1: Kafka's murmur2 on the key
	Created   time.Time // the row's created_at: its fingerprint in the checkpoint
	// EventID is the row's event_id, sent as header "outbox-event-id"
	// right after "outbox-id"; "" (a row from before migration 7) sends
	// no such header.
	EventID string
}

// Size is the record's payload in bytes, for metrics.
func (r Record) Size() int {
	n := len(r.Key) + len(r.Value) + len(r.EventID)
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
	partitions map[string]int   // partition counts, for explicit partitions
	maxBytes   map[string]int32 // the topics' max.message.bytes
	compacted  map[string]bool  // topics whose cleanup.policy includes compact
	epoch      int16

	// window holds the rows of the shard's last committed batches; every
	// checkpoint carries it with the new batch added (I2, I5).
	window Window
}

// StartWindow sets the recovery window recovery found (or an empty one):
// the next checkpoints carry it on.
func (p *Producer) StartWindow(w Window) { p.window = w }

// NewProducer creates shard's producer. In exactly-once mode it runs
// InitProducerID with the shard's transactional id (recovery step 1). That
// fences every earlier producer of the shard, whose next Kafka call fails, and
// completes or aborts the transaction it left open, so that afterwards the
// checkpoint partition holds no open transaction of this shard.
func NewProducer(ctx context.Context, cfg Config, shard int32) (*Producer, error) {
	log := cfg.Logger.With("shard", shard, "delivery", string(cfg.Settings.Mode))
	settings, err := cfg.Settings.opts()
	if err != nil {
		return nil, fmt.Errorf("producer of shard %d: %w", shard, err)
	}
	opts := append([]kgo.Opt{
		kgo.SeedBrokers(cfg.Brokers...),
		kgo.RecordPartitioner(rowPartitioner{}),
		kgo.WithLogger(KafkaLogger(log, kgo.LogLevelWarn)),
		// Metadata requests ask for auto-creation, as the Java producer's
		// allow.auto.create.topics=true does: brokers with
		// auto.create.topics.enable=true create a topic a row names.
		kgo.AllowAutoTopicCreation(),
	}, settings...)
	if cfg.Settings.Mode.Transactional() {
		log = log.With("transactional_id", cfg.TransactionalID(shard))
		opts = append(opts, kgo.TransactionalID(cfg.TransactionalID(shard)))
	}
	p := &Producer{cfg: cfg, shard: shard, log: log, partitions: map[string]int{}, maxBytes: map[string]int32{}, compacted: map[string]bool{}}
	opts = append(opts, kgo.ProducerBatchMaxBytesFn(p.batchMaxBytes))
	opts = append(opts, cfg.Extra...)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		return nil, fmt.Errorf("producer of shard %d: %w", shard, err)
	}
	p.cl, p.adm = cl, kadm.NewClient(cl)
	if !cfg.Settings.Mode.Transactional() {
		return p, nil
	}
	id, epoch, err := cl.ProducerID(ctx)
	if err != nil {
		cl.Close()
		return nil, fmt.Errorf("init producer id of %s: %w", cfg.TransactionalID(shard), classify(err))
	}
	p.epoch = epoch
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
// checkpoint record cp to the shard's checkpoint partition. Publish fills in
// cp's window: the rows of this batch (id and creation time) and of the
// shard's last committed batches, up to the window's limit.
//
// I1: the caller marks the rows published only after Publish returns nil:
// then, and only then, a committed transaction holds every record.
// I2: the checkpoint lists every row of the batch and of the batches before
// it within the window, so a crash after the commit and before the mark, or
// marks lost afterwards for up to the window's batches, are repaired by
// recovery from the checkpoint.
//
// sent, when not nil, is called once Kafka has acknowledged every record of
// the transaction, before the commit: from then on Publish needs none of
// the records' keys, values or headers (nothing is sent again; a failure
// from here on returns ErrAborted or ErrCommitUnknown, never
// *RecordErrors), so the caller may let them go and start on the next
// batch while the commit runs.
//
// Errors: ErrFenced (stop), ErrCommitUnknown (close, recover), ErrFatal,
// *RecordErrors (records Kafka refused; transaction aborted), or ErrAborted
// (nothing committed; retry).
func (p *Producer) Publish(ctx context.Context, recs []Record, cp Checkpoint, sent func()) error {
	if p.cfg.Tracer == nil {
		return p.publish(ctx, recs, cp, sent)
	}
	ctx, span := p.startSpan(ctx, "outbox-relay transaction", recs)
	err := p.publish(ctx, recs, cp, sent)
	endSpan(span, err)
	return err
}

// publish is Publish without its span.
func (p *Producer) publish(ctx context.Context, recs []Record, cp Checkpoint, sent func()) error {
	bad, err := p.checkRecords(ctx, recs)
	if err != nil {
		return fmt.Errorf("check records: %w", classify(err))
	}
	if len(bad) > 0 {
		return &RecordErrors{Records: bad, BeforeSend: true}
	}
	ids := make([]int64, len(recs))
	batch := make([]Committed, len(recs))
	for i, r := range recs {
		ids[i], batch[i] = r.ID, Committed{ID: r.ID, Created: r.Created}
	}
	next := p.window.With(batch)
	cp.SetWindow(next)
	cp.Written = time.Now().UTC()
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
	// One promise for every record: it runs only to look at a failure,
	// and finds the row's id in the record's first header (the checkpoint
	// record has none). A closure per record was a tenth of the batch's
	// garbage.
	promise := func(rec *kgo.Record, err error) {
		if err == nil {
			return
		}
		id := recordID(rec)
		mu.Lock()
		defer mu.Unlock()
		switch {
		case id < 0 && isRecordFatal(err):
			// The checkpoint record itself was refused: no batch can
			// ever commit; stop with the settings to change.
			otherErr = fmt.Errorf("%w: the checkpoint record (%d bytes, %d rows in its window) was refused: %w; lower OUTBOX_BATCH_SIZE or OUTBOX_RECOVERY_WINDOW, or raise the checkpoint topic's max.message.bytes and OUTBOX_KAFKA_BATCH_SIZE",
				ErrFatal, len(cpValue), len(next.Rows()), err)
		case isRecordFatal(err):
			p.forgetIfGone(rec.Topic, err)
			recordErrs = append(recordErrs, &RecordError{ID: id, Err: err})
		case otherErr == nil:
			otherErr = err
		}
	}
	watch := p.watchTopics(ctx, recs)
	krecs := kafkaRecords(recs)
	for i := range krecs {
		p.cl.Produce(ctx, &krecs[i], promise)
	}
	p.cl.Produce(ctx, &kgo.Record{
		Topic:     p.cfg.CheckpointTopic,
		Partition: p.shard,
		Key:       []byte(p.cfg.TransactionalID(p.shard)),
		Value:     cpValue,
	}, promise)

	// Flush waits for every produce answer (kgo retries lost acks itself;
	// the idempotent sequence numbers make the broker drop the duplicate,
	// which is how a lost produce acknowledgement cannot duplicate a row).
	flushErr := p.cl.Flush(ctx)
	// Every record is answered: the client holds them no more, and the
	// batch's keys and values are let go with the caller's (sent).
	clear(krecs)
	krecs = nil
	gone := watch.stop()
	mu.Lock()
	rerrs, oerr := recordErrs, otherErr
	mu.Unlock()
	if flushErr != nil || rerrs != nil || oerr != nil || len(gone) > 0 {
		abortErr := p.abortAfterFailure(ctx)
		switch {
		case len(gone) > 0 && abortErr == nil && !errors.Is(oerr, ErrFatal) && (oerr == nil || !isFenced(oerr) && !isRelayFatal(oerr)):
			// A topic deleted after the check: its produce would wait out
			// the client's unknown-topic retries (seconds apart, up to the
			// transaction's budget). The watch found it gone from metadata
			// and aborted the produce; the transaction is aborted, so its
			// rows alone are at fault, as if refused before sending.
			return &RecordErrors{Records: gone.records(recs), BeforeSend: true}
		case errors.Is(oerr, ErrFatal):
			return oerr
		case oerr != nil && (isFenced(oerr) || isRelayFatal(oerr)):
			return fmt.Errorf("produce: %w", classify(oerr))
		case abortErr != nil && (isFenced(abortErr) || isRelayFatal(abortErr)):
			return fmt.Errorf("abort after failed produce: %w", classify(abortErr))
		case abortErr != nil:
			// The abort itself failed: this producer's transaction may
			// still be open, so the caller recovers (a new producer's
			// InitProducerID settles it) rather than retry here.
			return fmt.Errorf("abort after failed produce did not complete, recovering: %w", abortErr)
		case rerrs != nil:
			return &RecordErrors{Records: rerrs}
		case oerr != nil:
			return fmt.Errorf("produce: %w", classify(oerr))
		default:
			return fmt.Errorf("flush: %w", classify(flushErr))
		}
	}

	if sent != nil {
		sent()
	}
	if p.cfg.BeforeCommit != nil {
		if err := p.cfg.BeforeCommit(ctx, p.shard, ids); err != nil {
			return err
		}
	}

	// The commit. Its answer decides what the caller may do:
	err = p.cl.EndTransaction(ctx, kgo.TryCommit)
	switch {
	case err == nil:
		p.window = next
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

// topicWatchAfter is how long a produce may wait before the producer looks
// whether a topic of its records was deleted after the check
// (watchTopics).
const topicWatchAfter = 500 * time.Millisecond

// goneTopics are the topics watchTopics found deleted, with the error their
// records are refused with.
type goneTopics map[string]error

// records are the record errors of the records of recs whose topic is gone.
func (g goneTopics) records(recs []Record) []*RecordError {
	var out []*RecordError
	for _, r := range recs {
		if err, ok := g[r.Topic]; ok {
			out = append(out, &RecordError{ID: r.ID, Err: err})
		}
	}
	return out
}

// topicWatch is a running watchTopics.
type topicWatch struct {
	cancel context.CancelFunc
	done   chan struct{}
	gone   goneTopics
}

// stop ends the watch and returns the topics it found gone (nil: none).
func (w *topicWatch) stop() goneTopics {
	w.cancel()
	<-w.done
	return w.gone
}

// watchTopics guards a produce of recs against a topic deleted after
// checkRecords learned it. franz-go retries a produce that meets
// UNKNOWN_TOPIC_OR_PARTITION after each metadata refresh (at most one in
// 5 s) and fails the record only after four such answers, so the whole
// transaction would wait 15 s or more, or run out of its budget. Once the
// produce has run topicWatchAfter, the watch asks the cluster about the
// records' topics every topicRefreshDelay; a topic the cluster calls
// unknown twice in a row (the rule of learn) is forgotten and the buffered
// records are aborted, so that the produce returns at once and the caller
// refuses that topic's records.
func (p *Producer) watchTopics(ctx context.Context, recs []Record) *topicWatch {
	var topics []string
	for _, r := range recs {
		if !slices.Contains(topics, r.Topic) {
			topics = append(topics, r.Topic)
		}
	}
	wctx, cancel := context.WithCancel(ctx)
	w := &topicWatch{cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(w.done)
		wait := topicWatchAfter
		unknown := map[string]int{}
		for {
			select {
			case <-wctx.Done():
				return
			case <-time.After(wait):
			}
			wait = topicRefreshDelay
			_, errs, err := p.describeTopics(wctx, topics)
			if err != nil {
				continue
			}
			gone := goneTopics{}
			for _, t := range topics {
				if !errors.Is(errs[t], kerr.UnknownTopicOrPartition) {
					unknown[t] = 0
					continue
				}
				if unknown[t]++; unknown[t] >= 2 {
					gone[t] = fmt.Errorf("topic %q does not exist: it was deleted after the relay checked it (the cluster said so twice, %v apart, while its records waited): create the topic, or set OUTBOX_CREATE_TOPICS=true to have the relay create missing topics; then requeue the row (outbox-relay dlq requeue) (%w)",
						t, topicRefreshDelay, kerr.UnknownTopicOrPartition)
				}
			}
			if len(gone) == 0 {
				continue
			}
			for t := range gone {
				p.forget(t)
			}
			w.gone = gone
			p.log.Warn("topics deleted after they were checked: their records are refused, the rest goes on", "topics", slices.Sorted(maps.Keys(gone)))
			// The records wait for the client's next metadata update (at
			// most one in 5 s) to be tried again; the abort fails them at
			// that safe point, so the update is asked for now. The parent
			// context: a wait quit early leaves the client in an invalid
			// state (franz-go). It returns once no record is buffered, as
			// the Flush that stop follows does.
			p.cl.ForceMetadataRefresh()
			_ = p.cl.AbortBufferedRecords(ctx)
			return
		}
	}()
	return w
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

// HeaderEventID is the record header holding the row's event id (a UUID,
// column event_id), the identity consumers deduplicate by: unique across
// tables, databases, restores and fail-overs, where the row id is not.
const HeaderEventID = "outbox-event-id"

// Check returns the records Kafka would refuse for reasons of their own
// (see checkRecords), for callers that must know before they send: every
// record it returns is refused on its own account, never for a batch-mate's.
// An error means the cluster could not be asked (the batch should be tried
// again later), not that a record is bad.
func (p *Producer) Check(ctx context.Context, recs []Record) ([]*RecordError, error) {
	return p.checkRecords(ctx, recs)
}

// Topic look-ups before a topic the cluster does not know is called missing.
const (
	// topicRefreshDelay: after a metadata answer that a topic does not
	// exist, ask once more after this long before deciding. A topic just
	// created (by an operator, or by the brokers' auto-creation that the
	// first request asked for) may not be in every broker's metadata yet.
	topicRefreshDelay = 500 * time.Millisecond
	// topicReadyTimeout bounds the wait for a topic being created to show
	// its partitions; past it, the produce goes ahead and reports.
	topicReadyTimeout = 10 * time.Second
)

// checkRecords refuses, before producing, records Kafka would refuse for
// reasons of their own: a topic that does not exist (found from metadata,
// after one refresh, the brokers' auto-creation and, with CreateTopics, the
// producer's own creation of it), a topic the cluster denies or calls
// invalid, an explicit partition the topic does not have, or a record larger
// than the topic's max.message.bytes (or the producer's batch limit).
// franz-go would fail them all the same, but only after its retries (for a
// missing topic, minutes: every record of the transaction waits) and with an
// error that does not name the cause.
//
// It asks the cluster once per batch about the topics it has not cached, all
// in one request. Its error means the cluster could not be asked.
func (p *Producer) checkRecords(ctx context.Context, recs []Record) ([]*RecordError, error) {
	var unknown []string
	seen := map[string]bool{}
	for _, r := range recs {
		if !seen[r.Topic] {
			seen[r.Topic] = true
			if !p.known(r.Topic) {
				unknown = append(unknown, r.Topic)
			}
		}
	}
	refused := map[string]error{}
	if len(unknown) > 0 {
		var err error
		if refused, err = p.learn(ctx, unknown); err != nil {
			return nil, err
		}
	}
	learned := map[string]bool{}
	for _, t := range unknown {
		learned[t] = true
	}
	bad, stale := p.refuse(recs, refused, learned)
	if len(stale) > 0 {
		// Partitions or max.message.bytes may have grown since they were
		// cached: look again before refusing a row.
		for _, t := range stale {
			p.forget(t)
			learned[t] = true
		}
		more, err := p.learn(ctx, stale)
		if err != nil {
			return nil, err
		}
		maps.Copy(refused, more)
		bad, _ = p.refuse(recs, refused, learned)
	}
	return bad, nil
}

// refuse returns the records of recs that refused (topic errors) or the
// cached topic facts refuse. A record the cached facts of a topic not in
// learned would refuse is not refused: its topic is returned in stale, to be
// looked at again.
func (p *Producer) refuse(recs []Record, refused map[string]error, learned map[string]bool) (bad []*RecordError, stale []string) {
	for _, r := range recs {
		if err, ok := refused[r.Topic]; ok {
			bad = append(bad, &RecordError{ID: r.ID, Err: err})
			continue
		}
		p.mu.Lock()
		n, ok := p.partitions[r.Topic]
		p.mu.Unlock()
		if !ok {
			continue // not known yet (still being created): let the produce report it
		}
		if !learned[r.Topic] && p.refused(r, n) {
			if !slices.Contains(stale, r.Topic) {
				stale = append(stale, r.Topic)
			}
			continue
		}
		if r.Partition >= 0 && int(r.Partition) >= n {
			bad = append(bad, &RecordError{ID: r.ID, Err: fmt.Errorf(
				"partition %d does not exist: topic %q has %d partitions; fix the row's partition or add partitions", r.Partition, r.Topic, n)})
			continue
		}
		if r.Key == nil && p.isCompacted(r.Topic) {
			bad = append(bad, &RecordError{ID: r.ID, Err: fmt.Errorf(
				"%w: column key is NULL and topic %q is compacted (cleanup.policy=compact): Kafka refuses a record without a key there; give the row a key, or write it to a topic that is not compacted",
				kerr.InvalidRecord, r.Topic)})
			continue
		}
		if size, limit := r.batchSize(), p.batchMaxBytes(r.Topic); size > int(limit) {
			bad = append(bad, &RecordError{ID: r.ID, Err: fmt.Errorf(
				"%w: record is %d bytes in its batch, more than %d (the smaller of topic %q max.message.bytes and the producer's batch.size); shrink the row or raise the limit",
				kerr.MessageTooLarge, size, limit, r.Topic)})
		}
	}
	return bad, stale
}

// refused reports whether r fails the checks of checkRecords against a topic
// of n partitions.
func (p *Producer) refused(r Record, n int) bool {
	return r.Partition >= 0 && int(r.Partition) >= n || r.batchSize() > int(p.batchMaxBytes(r.Topic)) || r.Key == nil && p.isCompacted(r.Topic)
}

// isCompacted reports whether topic's cleanup.policy, as last learned,
// includes compact.
func (p *Producer) isCompacted(topic string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.compacted[topic]
}

// known reports whether the producer has cached topic's partition count.
func (p *Producer) known(topic string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	_, ok := p.partitions[topic]
	return ok
}

// forgetIfGone forgets topic when a produce to it failed because the
// cluster no longer has it (deleted after the check), so that the next check
// asks again and refuses its records at once.
func (p *Producer) forgetIfGone(topic string, err error) {
	if errors.Is(err, kerr.UnknownTopicOrPartition) || errors.Is(err, kerr.UnknownTopicID) {
		p.forget(topic)
	}
}

// forget drops what is cached about topic.
func (p *Producer) forget(topic string) {
	p.mu.Lock()
	delete(p.partitions, topic)
	delete(p.maxBytes, topic)
	delete(p.compacted, topic)
	p.mu.Unlock()
}

// batchSize is an upper bound of the record's size inside a record batch of
// its own, as the broker measures it against max.message.bytes.
func (r Record) batchSize() int {
	const batchOverhead, recordOverhead, headerOverhead = 61, 21, 10
	n := batchOverhead + recordOverhead + len(r.Key) + len(r.Value) + headerOverhead + len(HeaderOutboxID) + 20
	for _, h := range r.Headers {
		n += headerOverhead + len(h.Key) + len(h.Value)
	}
	return n
}

// learn asks the cluster about topics and caches the partition count and
// max.message.bytes of those that exist. It returns the topics whose records
// must be refused, with the error for them: a topic that still does not
// exist after one refresh (and that it was not allowed, or failed, to
// create), one the cluster denies or calls invalid. A topic being created
// is waited for, up to topicReadyTimeout. Its error means the cluster could
// not be asked, or answered with an error a retry may mend.
func (p *Producer) learn(ctx context.Context, topics []string) (map[string]error, error) {
	refused := map[string]error{}
	ready := map[string]int{}
	triage := func(parts map[string]int, errs map[string]error) (missing, pending []string, err error) {
		for t, n := range parts {
			ready[t] = n
		}
		for t, e := range errs {
			switch {
			case errors.Is(e, kerr.UnknownTopicOrPartition):
				missing = append(missing, t)
			case errors.Is(e, kerr.LeaderNotAvailable):
				pending = append(pending, t) // being created
			case kerr.IsRetriable(e):
				return nil, nil, fmt.Errorf("metadata of topic %q: %w", t, e)
			default:
				// Denied, an invalid name, an auto-creation the brokers
				// refused (INVALID_REPLICATION_FACTOR): no retry mends it.
				refused[t] = fmt.Errorf("topic %q: the cluster's metadata answer is %w", t, e)
			}
		}
		return missing, pending, nil
	}

	parts, errs, err := p.describeTopics(ctx, topics)
	if err != nil {
		return nil, err
	}
	missing, pending, err := triage(parts, errs)
	if err != nil {
		return nil, err
	}
	if len(missing) > 0 {
		select {
		case <-ctx.Done():
			return nil, ctx.Err()
		case <-time.After(topicRefreshDelay):
		}
		if parts, errs, err = p.describeTopics(ctx, missing); err != nil {
			return nil, err
		}
		var later []string
		if missing, later, err = triage(parts, errs); err != nil {
			return nil, err
		}
		pending = append(pending, later...)
	}
	if len(missing) > 0 && !p.cfg.CreateTopics {
		for _, t := range missing {
			refused[t] = fmt.Errorf("topic %q does not exist (the cluster said so twice, %v apart; it does not auto-create topics): create the topic, or set OUTBOX_CREATE_TOPICS=true to have the relay create missing topics; then requeue the row (outbox-relay dlq requeue) (%w)",
				t, topicRefreshDelay, kerr.UnknownTopicOrPartition)
		}
	} else if len(missing) > 0 {
		created, err := p.createTopics(ctx, missing, refused)
		if err != nil {
			return nil, err
		}
		pending = append(pending, created...)
	}
	if len(pending) > 0 {
		// Created, by the brokers or by us: wait until every broker
		// knows it, so the produce does not meet UNKNOWN_TOPIC_OR_PARTITION.
		wait, cancel := context.WithTimeout(ctx, topicReadyTimeout)
		for len(pending) > 0 && wait.Err() == nil {
			parts, _, err := p.describeTopics(wait, pending)
			if err == nil {
				for t, n := range parts {
					ready[t] = n
				}
				pending = slices.DeleteFunc(pending, func(t string) bool { _, ok := parts[t]; return ok })
			}
			if len(pending) > 0 {
				select {
				case <-wait.Done():
				case <-time.After(100 * time.Millisecond):
				}
			}
		}
		cancel()
		if len(pending) > 0 {
			p.log.Warn("topics created but not yet ready; producing anyway", "topics", pending, "waited", topicReadyTimeout.String())
		}
	}
	p.cacheTopics(ctx, ready)
	return refused, nil
}

// createTopics creates the missing topics (CreateTopics) with the configured
// partitions and replication factor and returns those created (or created
// meanwhile by someone else). A topic the cluster refuses to create is put
// in refused with the reason and the settings to fix; an error a retry may
// mend is returned.
func (p *Producer) createTopics(ctx context.Context, missing []string, refused map[string]error) ([]string, error) {
	parts, rf := p.cfg.CreateTopicPartitions, p.cfg.CreateTopicReplicationFactor
	if parts == 0 {
		parts = -1
	}
	if rf == 0 {
		rf = -1
	}
	resps, err := p.adm.CreateTopics(ctx, parts, rf, nil, missing...)
	if err != nil {
		return nil, fmt.Errorf("create topics %v: %w", missing, err)
	}
	var created []string
	for _, r := range resps.Sorted() {
		switch {
		case r.Err == nil:
			p.log.Info("topic created (OUTBOX_CREATE_TOPICS=true)", "topic", r.Topic, "partitions", r.NumPartitions, "replication_factor", r.ReplicationFactor)
			created = append(created, r.Topic)
		case errors.Is(r.Err, kerr.TopicAlreadyExists):
			created = append(created, r.Topic)
		case kerr.IsRetriable(r.Err):
			return nil, fmt.Errorf("create topic %q: %w", r.Topic, r.Err)
		default:
			msg := ""
			if r.ErrMessage != "" {
				msg = " (" + r.ErrMessage + ")"
			}
			refused[r.Topic] = fmt.Errorf("topic %q does not exist and creating it with %d partitions and replication factor %d (-1: the brokers' default) failed: %w%s; fix OUTBOX_CREATE_TOPIC_PARTITIONS or OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR, grant the relay Create on the topic, or create the topic yourself; then requeue the row (outbox-relay dlq requeue)",
				r.Topic, parts, rf, r.Err, msg)
		}
	}
	return created, nil
}

// describeTopics asks the cluster about topics in one metadata request that
// asks for auto-creation, as the Java producer does by default
// (allow.auto.create.topics=true): brokers with
// auto.create.topics.enable=true create a missing topic. It returns the
// partition count of each topic that exists with its partitions, and the
// error of each other (UNKNOWN_TOPIC_OR_PARTITION for a topic not in the
// answer, LEADER_NOT_AVAILABLE for one without partitions yet).
func (p *Producer) describeTopics(ctx context.Context, topics []string) (map[string]int, map[string]error, error) {
	req := kmsg.NewPtrMetadataRequest()
	req.AllowAutoTopicCreation = true
	for _, t := range topics {
		rt := kmsg.NewMetadataRequestTopic()
		rt.Topic = kmsg.StringPtr(t)
		req.Topics = append(req.Topics, rt)
	}
	resp, err := req.RequestWith(ctx, p.cl)
	if err != nil {
		return nil, nil, fmt.Errorf("metadata of topics %v: %w", topics, err)
	}
	parts, errs := map[string]int{}, map[string]error{}
	for _, t := range resp.Topics {
		switch {
		case t.Topic == nil:
		case t.ErrorCode != 0:
			errs[*t.Topic] = kerr.ErrorForCode(t.ErrorCode)
		case len(t.Partitions) == 0:
			errs[*t.Topic] = kerr.LeaderNotAvailable
		default:
			parts[*t.Topic] = len(t.Partitions)
		}
	}
	for _, t := range topics {
		if _, ok := parts[t]; !ok && errs[t] == nil {
			errs[t] = kerr.UnknownTopicOrPartition
		}
	}
	return parts, errs, nil
}

// cacheTopics caches the partition counts of topics that exist, and learns
// their max.message.bytes and cleanup.policy (one DescribeConfigs request;
// without the permission, the producer's batch limit alone applies, and a
// keyless record to a compacted topic is refused by the broker, after
// sending).
func (p *Producer) cacheTopics(ctx context.Context, parts map[string]int) {
	if len(parts) == 0 {
		return
	}
	limits := map[string]int32{}
	compacted := map[string]bool{}
	if rcs, err := p.adm.DescribeTopicConfigs(ctx, slices.Collect(maps.Keys(parts))...); err == nil {
		for _, rc := range rcs {
			if rc.Err != nil {
				continue
			}
			for _, kv := range rc.Configs {
				if kv.Key == "cleanup.policy" && kv.Value != nil && slices.Contains(strings.Split(*kv.Value, ","), "compact") {
					compacted[rc.Name] = true
				}
				if kv.Key == "max.message.bytes" && kv.Value != nil {
					if v, err := strconv.ParseInt(*kv.Value, 10, 32); err == nil && v > 0 {
						limits[rc.Name] = int32(v)
					}
				}
			}
		}
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	for t, n := range parts {
		p.partitions[t] = n
		if l, ok := limits[t]; ok {
			p.maxBytes[t] = l
		}
		p.compacted[t] = compacted[t]
	}
}

// batchMaxBytes is the largest record batch for topic: the producer's
// batch.size, lowered to the topic's max.message.bytes when known.
func (p *Producer) batchMaxBytes(topic string) int32 {
	limit := p.cfg.Settings.BatchMaxBytes
	if limit <= 0 {
		limit = 1 << 20
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if m, ok := p.maxBytes[topic]; ok && m < limit {
		return m
	}
	return limit
}

// Send produces recs without a transaction (at-least-once and at-most-once)
// and waits until every record has its answer: an acknowledgement, or for
// acks=0 the request written. It returns the ids acknowledged, the records
// Kafka refused for reasons of their own, and the first other error (the
// records without an answer are then neither acknowledged nor refused: the
// caller must not mark them in at-least-once mode).
func (p *Producer) Send(ctx context.Context, recs []Record) (acked []int64, refused []*RecordError, err error) {
	if p.cfg.Tracer == nil {
		return p.send(ctx, recs)
	}
	ctx, span := p.startSpan(ctx, "outbox-relay send", recs)
	acked, refused, err = p.send(ctx, recs)
	endSpan(span, err)
	return acked, refused, err
}

// send is Send without its span.
func (p *Producer) send(ctx context.Context, recs []Record) (acked []int64, refused []*RecordError, err error) {
	if refused, err = p.checkRecords(ctx, recs); err != nil {
		return nil, nil, fmt.Errorf("check records: %w", classify(err))
	}
	skip := map[int64]bool{}
	for _, r := range refused {
		skip[r.ID] = true
	}
	var (
		mu       sync.Mutex
		wg       sync.WaitGroup
		otherErr error
	)
	ok := make([]bool, len(recs))
	aborted := make([]bool, len(recs))
	watch := p.watchTopics(ctx, recs)
	for i, r := range recs {
		if skip[r.ID] {
			continue
		}
		wg.Add(1)
		p.cl.Produce(ctx, p.kafkaRecord(r), func(_ *kgo.Record, err error) {
			defer wg.Done()
			mu.Lock()
			defer mu.Unlock()
			switch {
			case err == nil:
				ok[i] = true
			case errors.Is(err, kgo.ErrAborting):
				aborted[i] = true // by the watch: see below
			case isRecordFatal(err):
				p.forgetIfGone(r.Topic, err)
				refused = append(refused, &RecordError{ID: r.ID, Err: err})
			case otherErr == nil:
				otherErr = err
			}
		})
	}
	wg.Wait()
	gone := watch.stop()
	for i, r := range recs {
		switch {
		case ok[i]:
			acked = append(acked, r.ID)
		case aborted[i] && gone[r.Topic] != nil:
			// Its topic was deleted after the check (watchTopics).
			refused = append(refused, &RecordError{ID: r.ID, Err: gone[r.Topic]})
		case aborted[i] && len(gone) == 0 && otherErr == nil:
			otherErr = kgo.ErrAborting
		}
		// A record of another topic aborted with them is neither
		// acknowledged nor refused: it stays unmarked and goes out again.
	}
	if otherErr != nil {
		return acked, refused, fmt.Errorf("produce: %w", classify(otherErr))
	}
	return acked, refused, nil
}

// kafkaRecords is kafkaRecord for a batch, in a few allocations instead of
// four per record: the records, their headers and the headers' bytes each
// in one array.
func kafkaRecords(recs []Record) []kgo.Record {
	nh, nb := 0, 0
	for _, r := range recs {
		nh += 2 + len(r.Headers)
		nb += 20 + len(r.EventID) // an int64 takes at most 20 digits
	}
	hs := make([]kgo.RecordHeader, 0, nh)
	buf := make([]byte, 0, nb) // never grown: the headers' values point into it
	out := make([]kgo.Record, len(recs))
	for i, r := range recs {
		first := len(hs)
		b := len(buf)
		buf = strconv.AppendInt(buf, r.ID, 10)
		hs = append(hs, kgo.RecordHeader{Key: HeaderOutboxID, Value: buf[b:len(buf):len(buf)]})
		if r.EventID != "" {
			b = len(buf)
			buf = append(buf, r.EventID...)
			hs = append(hs, kgo.RecordHeader{Key: HeaderEventID, Value: buf[b:len(buf):len(buf)]})
		}
		hs = append(hs, r.Headers...)
		out[i] = kgo.Record{Topic: r.Topic, Key: r.Key, Value: r.Value, Partition: r.Partition, Headers: hs[first:len(hs):len(hs)]}
	}
	return out
}

// recordID is the outbox id a record built by kafkaRecords carries in its
// first header, -1 for a record without one (the checkpoint).
func recordID(rec *kgo.Record) int64 {
	if len(rec.Headers) == 0 || rec.Headers[0].Key != HeaderOutboxID {
		return -1
	}
	id, err := strconv.ParseInt(string(rec.Headers[0].Value), 10, 64)
	if err != nil {
		return -1
	}
	return id
}

// kafkaRecord is the Kafka record of an outbox row: header "outbox-id" (the
// decimal row id) first, then "outbox-event-id" when the row has an event
// id, then the row's headers.
func (p *Producer) kafkaRecord(r Record) *kgo.Record {
	hs := make([]kgo.RecordHeader, 0, 2+len(r.Headers))
	hs = append(hs, kgo.RecordHeader{Key: HeaderOutboxID, Value: strconv.AppendInt(nil, r.ID, 10)})
	if r.EventID != "" {
		hs = append(hs, kgo.RecordHeader{Key: HeaderEventID, Value: []byte(r.EventID)})
	}
	return &kgo.Record{
		Topic:     r.Topic,
		Key:       r.Key,
		Value:     r.Value,
		Partition: r.Partition,
		Headers:   append(hs, r.Headers...),
	}
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

// KafkaLogger returns a franz-go logger that writes lines at level or above
// to l, prefixed "kafka: ".
func KafkaLogger(l *slog.Logger, level kgo.LogLevel) kgo.Logger { return kgoLogger{l, level} }

// kgoLogger sends franz-go's log lines to slog.
type kgoLogger struct {
	l     *slog.Logger
	level kgo.LogLevel
}

func (k kgoLogger) Level() kgo.LogLevel { return k.level }
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

// PartitionOf is the partition the relay gives a row's record on a topic of n
// partitions: its explicit partition (partition >= 0), else Kafka's murmur2
// of the key, else (keyless) a hash of the outbox id.
func PartitionOf(key []byte, id int64, partition int32, n int) int32 {
	rec := &kgo.Record{Key: key, Partition: partition,
		Headers: []kgo.RecordHeader{{Key: HeaderOutboxID, Value: strconv.AppendInt(nil, id, 10)}}}
	return int32(rowPartitioner{}.ForTopic("").Partition(rec, n))
}
