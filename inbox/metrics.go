package inbox

import (
	"errors"
	"fmt"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the inbox's Prometheus metrics, prefix outbox_inbox_, created
// on the registerer the caller passes in (never the global default).
type metrics struct {
	applied       prometheus.Counter
	redelivered   prometheus.Counter
	duplicates    prometheus.Counter
	deadLetters   *prometheus.CounterVec
	handlerErrors prometheus.Counter
	dbErrors      prometheus.Counter
	fetchErrors   prometheus.Counter
	fenced        prometheus.Counter
	assignments   prometheus.Counter
	owned         prometheus.Gauge
	txnDuration   prometheus.Histogram
}

func newMetrics(reg prometheus.Registerer) *metrics {
	const ns = "outbox_inbox"
	m := &metrics{
		applied: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "applied_events_total",
			Help: "Events the handler applied, in committed transactions."}),
		redelivered: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "redelivered_records_total",
			Help: "Records skipped because their offset is below the stored one."}),
		duplicates: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "duplicate_events_total",
			Help: "Records skipped because their topic and outbox-id were applied already."}),
		deadLetters: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Name: "dead_letters_total",
			Help: "Records moved to the dead-letter table, by reason (handler, permanent, no_outbox_id)."}, []string{"reason"}),
		handlerErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "handler_errors_total",
			Help: "Handler errors; each rolled back its transaction."}),
		dbErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "database_errors_total",
			Help: "Failed inbox transactions that were not the handler's fault (retried)."}),
		fetchErrors: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "fetch_errors_total",
			Help: "Kafka fetch errors (retried)."}),
		fenced: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "fenced_total",
			Help: "Transactions refused because the partition was assigned again."}),
		assignments: prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Name: "partition_assignments_total",
			Help: "Partitions assigned to this instance (each bumped the partition's epoch)."}),
		owned: prometheus.NewGauge(prometheus.GaugeOpts{Namespace: ns, Name: "owned_partitions",
			Help: "Partitions this instance holds."}),
		txnDuration: prometheus.NewHistogram(prometheus.HistogramOpts{Namespace: ns, Name: "transaction_duration_seconds",
			Help: "From begin to commit of an applying transaction.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16)}),
	}
	m.applied = register(reg, m.applied)
	m.redelivered = register(reg, m.redelivered)
	m.duplicates = register(reg, m.duplicates)
	m.deadLetters = register(reg, m.deadLetters)
	m.handlerErrors = register(reg, m.handlerErrors)
	m.dbErrors = register(reg, m.dbErrors)
	m.fetchErrors = register(reg, m.fetchErrors)
	m.fenced = register(reg, m.fenced)
	m.assignments = register(reg, m.assignments)
	m.owned = register(reg, m.owned)
	m.txnDuration = register(reg, m.txnDuration)
	return m
}

// register registers c on reg, or returns the collector already registered
// under its name, so that a program can run one Inbox after another on one
// registry (a restart after an error) and the counts go on.
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
		panic(fmt.Sprintf("inbox: register metrics: %v", err))
	}
	return c
}
