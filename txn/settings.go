package txn

import (
	"fmt"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Mode is a delivery semantics: what a crash can do to the rows in flight.
type Mode string

// The three delivery modes.
const (
	// ExactlyOnce: idempotent, transactional producer with acks=all; rows
	// are marked after the transaction commits. A crash can do nothing: no
	// loss, no duplicate (for read_committed consumers).
	ExactlyOnce Mode = "exactly-once"
	// AtLeastOnce: idempotent producer with acks=all, no transaction; rows
	// are marked after every record of the batch is acknowledged. A crash
	// can duplicate the unmarked batch; duplicates carry the same outbox-id.
	AtLeastOnce Mode = "at-least-once"
	// AtMostOnce: acks=0, no retries; rows are marked before producing. A
	// crash can lose the marked, unsent batch; the relay reports it.
	AtMostOnce Mode = "at-most-once"
)

// ParseMode reads a mode by its name.
func ParseMode(s string) (Mode, error) {
	switch m := Mode(s); m {
	case ExactlyOnce, AtLeastOnce, AtMostOnce:
		return m, nil
	}
	return "", fmt.Errorf("unknown delivery mode %q: expected exactly-once, at-least-once or at-most-once", s)
}

// Transactional reports whether the mode uses Kafka transactions.
func (m Mode) Transactional() bool { return m == ExactlyOnce }

// AcksAll is the Acks value of acks=all.
const AcksAll = -1

// Settings are the producer settings, with Kafka's names and meaning. The
// relay resolves and checks them (relay.Config.Settings); txn applies them.
type Settings struct {
	Mode Mode
	// Acks is acks: 0, 1 or AcksAll.
	Acks int
	// Idempotence is enable.idempotence.
	Idempotence bool
	// MaxInFlight is max.in.flight.requests.per.connection.
	MaxInFlight int
	// Retries is retries: how often a failed produce request is retried,
	// bounded by DeliveryTimeout.
	Retries int
	// DeliveryTimeout is delivery.timeout.ms.
	DeliveryTimeout time.Duration
	// RequestTimeout is request.timeout.ms: how long the broker may take to
	// answer a produce request.
	RequestTimeout time.Duration
	// TransactionTimeout is transaction.timeout.ms.
	TransactionTimeout time.Duration
	// Linger is linger.ms.
	Linger time.Duration
	// BatchMaxBytes is the largest record batch (batch.size as a cap;
	// franz-go has no separate fill target).
	BatchMaxBytes int32
	// Compression is compression.type: none, gzip, snappy, lz4 or zstd.
	Compression string
	// ClientID is client.id.
	ClientID string
	// MetricsPush is enable.metrics.push (KIP-714): the clients send their
	// own metrics to brokers that subscribe to them. franz-go allocates
	// about 8 MiB for a moment each time a client takes a subscription.
	MetricsPush bool
}

// DefaultSettings are the safe defaults of mode: acks=all, idempotence on,
// 5 requests in flight, retries bounded only by delivery.timeout.ms=120 s
// (for at-most-once: acks=0, idempotence off, no retries).
func DefaultSettings(mode Mode) Settings {
	s := Settings{
		Mode: mode, Acks: AcksAll, Idempotence: true, MaxInFlight: 5, Retries: 2147483647,
		DeliveryTimeout: 120 * time.Second, RequestTimeout: 30 * time.Second, TransactionTimeout: 60 * time.Second,
		BatchMaxBytes: 1 << 20, Compression: "none", ClientID: "outbox-relay", MetricsPush: true,
	}
	if mode == AtMostOnce {
		s.Acks, s.Idempotence, s.Retries = 0, false, 0
	}
	return s
}

// opts turns the settings into franz-go producer options.
func (s Settings) opts() ([]kgo.Opt, error) {
	var opts []kgo.Opt
	switch s.Acks {
	case AcksAll:
		opts = append(opts, kgo.RequiredAcks(kgo.AllISRAcks()))
	case 1:
		opts = append(opts, kgo.RequiredAcks(kgo.LeaderAck()))
	case 0:
		opts = append(opts, kgo.RequiredAcks(kgo.NoAck()))
	default:
		return nil, fmt.Errorf("acks=%d: expected 0, 1 or all", s.Acks)
	}
	if !s.Idempotence {
		opts = append(opts, kgo.DisableIdempotentWrite(), kgo.MaxProduceRequestsInflightPerBroker(max(s.MaxInFlight, 1)))
	}
	// Kafka's default, MAX_INT, means "until delivery.timeout.ms", as
	// franz-go's default does. Otherwise franz-go counts tries, Kafka
	// retries after the first.
	if s.Retries < 2147483647 {
		opts = append(opts, kgo.RecordRetries(s.Retries+1))
	}
	if s.DeliveryTimeout > 0 {
		opts = append(opts, kgo.RecordDeliveryTimeout(s.DeliveryTimeout))
	}
	if s.RequestTimeout > 0 {
		opts = append(opts, kgo.ProduceRequestTimeout(s.RequestTimeout))
	}
	if s.TransactionTimeout > 0 && s.Mode.Transactional() {
		opts = append(opts, kgo.TransactionTimeout(s.TransactionTimeout))
	}
	opts = append(opts, kgo.ProducerLinger(s.Linger))
	if s.BatchMaxBytes > 0 {
		opts = append(opts, kgo.ProducerBatchMaxBytes(s.BatchMaxBytes))
	}
	codec, err := compression(s.Compression)
	if err != nil {
		return nil, err
	}
	opts = append(opts, kgo.ProducerBatchCompression(codec))
	if s.ClientID != "" {
		opts = append(opts, kgo.ClientID(s.ClientID))
	}
	return append(opts, s.clientOpts()...), nil
}

// clientOpts are the options of every Kafka client of the relay, not only
// its producers.
func (s Settings) clientOpts() []kgo.Opt {
	if !s.MetricsPush {
		return []kgo.Opt{kgo.DisableClientMetrics()}
	}
	return nil
}

func compression(name string) (kgo.CompressionCodec, error) {
	switch name {
	case "", "none":
		return kgo.NoCompression(), nil
	case "gzip":
		return kgo.GzipCompression(), nil
	case "snappy":
		return kgo.SnappyCompression(), nil
	case "lz4":
		return kgo.Lz4Compression(), nil
	case "zstd":
		return kgo.ZstdCompression(), nil
	}
	return kgo.CompressionCodec{}, fmt.Errorf("compression.type %q: expected none, gzip, snappy, lz4 or zstd", name)
}
