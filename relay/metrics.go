package relay

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the relay's Prometheus metrics, created on the registerer the
// caller passes in (never the global default).
type Metrics struct {
	Backlog         *prometheus.GaugeVec
	OldestAge       *prometheus.GaugeVec
	HeldRows        *prometheus.GaugeVec
	HeldKeys        *prometheus.GaugeVec
	Published       *prometheus.CounterVec
	PublishedBytes  *prometheus.CounterVec
	BatchSize       prometheus.Histogram
	TxnDuration     prometheus.Histogram
	EndToEnd        prometheus.Histogram
	Aborts          *prometheus.CounterVec
	Fenced          *prometheus.CounterVec
	DeadLetters     *prometheus.CounterVec
	Recoveries      *prometheus.CounterVec
	RecoveredMarked *prometheus.CounterVec
	PossiblyLost    *prometheus.CounterVec
	Rewinds         *prometheus.CounterVec
	// ConsecutiveFailures counts, per owned shard, the batches and
	// recoveries that failed in a row; the first success resets it.
	ConsecutiveFailures *prometheus.GaugeVec
	OwnedShards         prometheus.Gauge
	Shards              prometheus.Gauge
	Deleted             prometheus.Counter
	Takeovers           *prometheus.CounterVec
	ShardsLost          *prometheus.CounterVec
	// StandbyWait, StandbyHeld, StandbyLag and StandbyConnected are the
	// OUTBOX_STANDBY_NAMES barrier's: how long batches waited, how long
	// the current wait has lasted, and each standby's position.
	StandbyWait      prometheus.Histogram
	StandbyHeld      prometheus.Gauge
	StandbyLag       *prometheus.GaugeVec
	StandbyConnected *prometheus.GaugeVec
	// ReplicationLag is OUTBOX_SOURCE=replication's slot lag: WAL bytes
	// between the server's current position and the slot's confirmed
	// flush position.
	ReplicationLag *prometheus.GaugeVec
	// Phantoms counts rows a checkpoint recorded as published that the
	// database, at recovery, no longer has (or has as other rows).
	Phantoms *prometheus.CounterVec

	// ProducerIDRequests counts the InitProducerID requests of a shard's
	// transactional producer: one per exactly-once recovery.
	ProducerIDRequests *prometheus.CounterVec
	// ShardStopped is 1 for a shard this instance holds stopped until an
	// operator acts (haltsShard), 0 for the others it owns.
	ShardStopped *prometheus.GaugeVec
}

// NewMetrics creates the metrics and registers them on reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	const ns = "outbox_relay"
	shard := []string{"shard"}
	m := &Metrics{
		Backlog: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "backlog_rows",
			Help: "Unpublished outbox rows of an owned shard."}, shard),
		OldestAge: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "oldest_unpublished_age_seconds",
			Help: "Age of the oldest unpublished row of an owned shard; 0 when none."}, shard),
		HeldRows: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "held_rows",
			Help: "OUTBOX_DEAD_LETTER_ORDER=hold-key: unpublished rows of an owned shard held by a dead letter of their topic and key (requeue or discard it to release them)."}, shard),
		HeldKeys: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "held_keys",
			Help: "OUTBOX_DEAD_LETTER_ORDER=hold-key: distinct topics and keys of an owned shard whose rows a dead letter holds."}, shard),
		Published: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "published_records_total",
			Help: "Records published in committed Kafka transactions."}, shard),
		PublishedBytes: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "published_bytes_total",
			Help: "Key, value and header bytes of published records."}, shard),
		BatchSize: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "batch_size_rows",
			Help: "Rows per committed Kafka transaction.", Buckets: prometheus.ExponentialBuckets(1, 2, 15)}),
		TxnDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "transaction_duration_seconds",
			Help: "From BeginTransaction to a committed EndTxn.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 16)}),
		EndToEnd: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "end_to_end_latency_seconds",
			Help: "From a row's created_at to the commit of the transaction holding it.", Buckets: prometheus.ExponentialBuckets(0.001, 2, 20)}),
		Aborts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "transaction_aborts_total",
			Help: "Batches that did not commit or were not fully acknowledged, by reason (aborted, record_error, commit_unknown, send_failed)."}, []string{"shard", "reason"}),
		Fenced: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "fenced_total",
			Help: "Times this relay's producer was fenced by a newer owner of the shard."}, shard),
		DeadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "dead_letters_total",
			Help: "Rows moved to the dead-letter table."}, shard),
		Recoveries: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "recoveries_total",
			Help: "Recoveries run (taking a shard, or after an unknown commit outcome)."}, shard),
		RecoveredMarked: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "recovered_rows_total",
			Help: "Rows found committed in Kafka but unmarked, marked by recovery from the checkpoint."}, shard),
		PossiblyLost: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "at_most_once_lost_rows_total",
			Help: "At-most-once only: rows marked published whose send failed or was never confirmed (the previous owner crashed)."}, shard),
		Rewinds: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "table_rewinds_total",
			Help: "Recoveries that found the outbox table gone back in time (restored, RESTART IDENTITY, lost WAL): the checkpoint names ids the sequence has not reached, or ids now held by other rows."}, shard),
		ConsecutiveFailures: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "shard_consecutive_failures",
			Help: "Batches or recoveries of an owned shard that failed in a row for a reason that is not a row's (NOT_ENOUGH_REPLICAS, an offline partition, a broker or the database away); 0 again after the first success."}, shard),
		Takeovers: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "shard_takeovers_total",
			Help: "Shards whose owner's lease had expired (frozen, partitioned, wedged): this instance ended the owner's session to take them over."}, shard),
		ShardsLost: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "shards_lost_total",
			Help: "Shards this instance lost while owning them: its ownership session ended, or another relay took the lease."}, shard),
		OwnedShards: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "owned_shards",
			Help: "Shards this instance owns."}),
		Shards: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "shards",
			Help: "Shards the table is split into (OUTBOX_SHARDS): sum(owned_shards) should equal it."}),
		Deleted: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "retention_deleted_rows_total",
			Help: "Published rows deleted by retention."}),
		StandbyWait: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "standby_wait_seconds",
			Help: "OUTBOX_STANDBY_NAMES: how long each batch waited for the named standbys to flush its rows' commits.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 18)}),
		StandbyHeld: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "standby_held_seconds",
			Help: "OUTBOX_STANDBY_NAMES: how long the current wait for the named standbys has lasted; 0 when publishing is not held."}),
		StandbyLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "standby_lag_bytes",
			Help: "OUTBOX_STANDBY_NAMES: WAL bytes the standby has not flushed of what the relay waits for (-1 when it is not connected)."}, []string{"standby"}),
		StandbyConnected: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "standby_connected",
			Help: "OUTBOX_STANDBY_NAMES: 1 when the primary's pg_stat_replication lists the standby, 0 when it does not (publishing is held)."}, []string{"standby"}),
		ReplicationLag: prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "replication_lag_bytes",
			Help: "OUTBOX_SOURCE=replication: WAL bytes between the server's current position and the slot's confirmed flush position (the WAL the slot keeps because Kafka does not hold it yet), read every 5 s by the slot's reader."}, []string{"slot"}),
		Phantoms: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "phantom_rows_total",
			Help: "Rows a checkpoint recorded as published to Kafka that the database no longer has, or has as other rows (a fail-over to a standby that lacked them, a restore): Kafka holds events of transactions this database never had."}, shard),
	}
	reg.MustRegister(m.Backlog, m.OldestAge, m.HeldRows, m.HeldKeys, m.Published, m.PublishedBytes, m.BatchSize, m.TxnDuration, m.EndToEnd,
		m.Aborts, m.Fenced, m.DeadLetters, m.Recoveries, m.RecoveredMarked, m.PossiblyLost, m.Rewinds, m.ConsecutiveFailures,
		m.Takeovers, m.ShardsLost, m.OwnedShards, m.Shards, m.Deleted,
		m.StandbyWait, m.StandbyHeld, m.StandbyLag, m.StandbyConnected, m.Phantoms, m.ReplicationLag)
	m.ProducerIDRequests = prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "producer_id_requests_total",
		Help: "InitProducerID requests of the shard's transactional producer (exactly-once: one per recovery, each bumps the producer epoch). A batch that keeps failing is retried from 100 ms up to every 10 s, so a rate above a few a minute is a shard failing in a loop."}, shard)
	m.ShardStopped = prometheus.NewGaugeVec(prometheus.GaugeOpts{Namespace: ns, Name: "shard_stopped",
		Help: "1 while an owned shard is stopped until an operator acts (its checkpoint partition holds a record that is not a checkpoint): this instance keeps it, publishes none of its rows, and /readyz and `outbox-relay status` say why; 0 for the other owned shards."}, shard)
	reg.MustRegister(m.ProducerIDRequests, m.ShardStopped)
	return m
}

// abortReasons are the values of transaction_aborts_total's reason label.
var abortReasons = []string{"aborted", "record_error", "commit_unknown", "send_failed"}

// shardTaken creates the shard's series at zero, so that increase() and
// rate() see their first event.
func (m *Metrics) shardTaken(label string) {
	for _, c := range []*prometheus.CounterVec{m.Published, m.PublishedBytes, m.Fenced, m.DeadLetters, m.Recoveries, m.RecoveredMarked, m.PossiblyLost, m.Rewinds, m.Phantoms} {
		c.WithLabelValues(label)
	}
	for _, reason := range abortReasons {
		m.Aborts.WithLabelValues(label, reason)
	}
	m.ConsecutiveFailures.WithLabelValues(label).Set(0)
	m.ProducerIDRequests.WithLabelValues(label)
	m.ShardStopped.WithLabelValues(label).Set(0)
}

// shardReleased drops the gauges of a shard this instance no longer owns,
// so its backlog and failures are reported once, by its owner.
func (m *Metrics) shardReleased(label string) {
	m.Backlog.DeleteLabelValues(label)
	m.OldestAge.DeleteLabelValues(label)
	m.HeldRows.DeleteLabelValues(label)
	m.HeldKeys.DeleteLabelValues(label)
	m.ConsecutiveFailures.DeleteLabelValues(label)
	m.ShardStopped.DeleteLabelValues(label)
}
