package relay

import (
	"fmt"
	"math"
	"strconv"
	"time"
)

// The limits Kafka's protocol, franz-go, PostgreSQL and Linux put on the
// settings. A value beyond one is refused at start (Config.Validate): past
// it, the relay would start, answer ready, and fail every batch (a
// transaction timeout that overflows InitProducerID's int32 milliseconds),
// or silently run with another value (a lock_timeout below 1 ms is 0, off).
const (
	// MaxWireMillis is the largest duration of Kafka's int32-millisecond
	// fields (transaction.timeout.ms in InitProducerID, request.timeout.ms
	// in Produce) and of PostgreSQL's statement_timeout and lock_timeout:
	// 2147483647 ms, about 24.8 days.
	MaxWireMillis = time.Duration(math.MaxInt32) * time.Millisecond
	// DefaultTransactionMaxTimeout is Kafka's default
	// transaction.max.timeout.ms (15 minutes): the largest
	// transaction.timeout.ms brokers accept unless raised. The relay reads
	// the brokers' value at start.
	DefaultTransactionMaxTimeout = 15 * time.Minute
	// MinBatchMaxBytes and MaxBatchMaxBytes bound OUTBOX_KAFKA_BATCH_SIZE:
	// franz-go's smallest record batch, and its default
	// BrokerMaxWriteBytes (Kafka's socket.request.max.bytes default,
	// 100 MiB), which a batch must fit in.
	MinBatchMaxBytes = 512
	MaxBatchMaxBytes = 100 << 20
	// MaxLinger is the longest linger.ms franz-go accepts.
	MaxLinger = time.Minute
	// MaxOwnerLease is the longest OUTBOX_OWNER_LEASE: its half is the TCP
	// keepalive idle time, which Linux caps at 32767 s.
	MaxOwnerLease = 2 * 32767 * time.Second
	// maxClientID and maxTransactionalID are franz-go's limits on
	// client.id and the transactional id (bytes).
	maxClientID        = 256
	maxTransactionalID = 16382
)

// limitProblems checks every duration and size of c against the limits
// above; each problem names the variable and the range.
func (c Config) limitProblems() []string {
	var problems []string
	add := func(f string, a ...any) { problems = append(problems, fmt.Sprintf(f, a...)) }
	ms := func(name string, v, lo, hi time.Duration, why string) {
		if v != 0 && (v < lo || v > hi) {
			add("%s is %d: expected %d to %d milliseconds (%s)", name, v.Milliseconds(), lo.Milliseconds(), hi.Milliseconds(), why)
		}
	}
	ms("OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS", c.TransactionTimeout, time.Second, MaxWireMillis,
		"transaction.timeout.ms is an int32 of milliseconds, and at most the brokers' transaction.max.timeout.ms, 900000 by default: the relay checks it against the brokers at start")
	ms("OUTBOX_KAFKA_REQUEST_TIMEOUT_MS", c.RequestTimeout, 100*time.Millisecond, MaxWireMillis, "request.timeout.ms: franz-go's range, an int32 of milliseconds on the wire")
	ms("OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS", c.DeliveryTimeout, time.Second, MaxWireMillis, "delivery.timeout.ms: franz-go's least, Kafka's int32 of milliseconds")
	if c.Linger > MaxLinger {
		add("OUTBOX_KAFKA_LINGER_MS is %d: expected 0 to %d milliseconds (franz-go's longest linger.ms)", c.Linger.Milliseconds(), MaxLinger.Milliseconds())
	}
	if c.BatchMaxBytes != 0 && (c.BatchMaxBytes < MinBatchMaxBytes || c.BatchMaxBytes > MaxBatchMaxBytes) {
		add("OUTBOX_KAFKA_BATCH_SIZE is %d: expected %d to %d bytes (batch.size: franz-go's smallest record batch, and the largest request it writes to a broker, Kafka's socket.request.max.bytes default)",
			c.BatchMaxBytes, MinBatchMaxBytes, MaxBatchMaxBytes)
	}
	if c.Retries != nil && *c.Retries > math.MaxInt32 {
		add("OUTBOX_KAFKA_RETRIES is %d: expected at most %d (Kafka's retries is an int32)", *c.Retries, math.MaxInt32)
	}
	if len(c.ClientID) > maxClientID {
		add("OUTBOX_KAFKA_CLIENT_ID is %d bytes long: expected at most %d (franz-go's limit on client.id)", len(c.ClientID), maxClientID)
	}
	if id := len(c.RelayName) + 1 + len(strconv.Itoa(max(c.Shards-1, 0))); id > maxTransactionalID {
		add("OUTBOX_RELAY_NAME is %d bytes long: the transactional ids <name>-<shard> must stay within %d bytes (franz-go's limit); shorten it", len(c.RelayName), maxTransactionalID)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"OUTBOX_STATEMENT_TIMEOUT", c.StatementTimeout}, {"OUTBOX_LOCK_TIMEOUT", c.LockTimeout}} {
		if d.v > 0 && (d.v < time.Millisecond || d.v > MaxWireMillis) {
			add("%s is %v: expected 1ms to %v (PostgreSQL's range, in whole milliseconds; below 1ms it would be 0, no timeout)", d.name, d.v, MaxWireMillis)
		}
	}
	if c.OwnerLease > MaxOwnerLease {
		add("OUTBOX_OWNER_LEASE is %v: expected at most %v (half of it is the TCP keepalive idle time, which Linux caps at 32767s)", c.OwnerLease, MaxOwnerLease)
	}
	return problems
}
