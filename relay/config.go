package relay

import (
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/kafkaauth"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/pgauth"
	"github.com/outbox-relay/outbox-relay/txn"
)

// Config is the relay's configuration, read from environment variables.
// Every field's variable, default and meaning is in docs/configuration.md
// (its reference table is generated from these env tags and doc comments).
type Config struct {
	// DatabaseURL is the PostgreSQL connection string (URL or key=value),
	// including TLS settings (sslmode, sslrootcert, ...).
	DatabaseURL string `env:"OUTBOX_DATABASE_URL,required,notEmpty"`
	// KafkaBrokers are the seed brokers, host:port, comma-separated.
	KafkaBrokers []string `env:"OUTBOX_KAFKA_BROKERS,required,notEmpty" envSeparator:","`
	// Schema and Table name the outbox table.
	Schema string `env:"OUTBOX_SCHEMA" envDefault:"public"`
	Table  string `env:"OUTBOX_TABLE" envDefault:"outbox"`
	// RelayName prefixes the Kafka transactional ids ("<name>-<shard>").
	// Every relay instance of one outbox table uses the same name.
	RelayName string `env:"OUTBOX_RELAY_NAME" envDefault:"outbox-relay"`
	// CheckpointTopic is the compacted topic holding one checkpoint
	// partition per shard. Created on start if missing.
	CheckpointTopic string `env:"OUTBOX_CHECKPOINT_TOPIC" envDefault:"outbox-relay-checkpoints"`
	// Shards is the number of shards (transactional ids) the table is split
	// into by key; each is owned by one instance at a time.
	Shards int `env:"OUTBOX_SHARDS" envDefault:"1"`
	// BatchSize is the most rows one Kafka transaction carries.
	BatchSize int `env:"OUTBOX_BATCH_SIZE" envDefault:"500"`
	// RecoveryWindow is how many of a shard's most recent batches every
	// checkpoint lists, so that recovery re-applies their marks: losing the
	// marks of up to that many batches (a database crash with unflushed
	// commits, a fail-over to an asynchronous standby) republishes nothing.
	RecoveryWindow int `env:"OUTBOX_RECOVERY_WINDOW" envDefault:"8"`
	// StandbyNames are the physical standbys (their application_name in
	// pg_stat_replication) that must have flushed a row's commit before it
	// is published, so that a promotion of any of them finds every row that
	// Kafka holds (and the marks of all but the checkpoint's last batches).
	// A standby missing or behind holds publishing.
	StandbyNames []string `env:"OUTBOX_STANDBY_NAMES" envSeparator:","`
	// StatementTimeout and LockTimeout bound every query of the relay
	// (PostgreSQL's statement_timeout and lock_timeout).
	StatementTimeout time.Duration `env:"OUTBOX_STATEMENT_TIMEOUT" envDefault:"30s"`
	LockTimeout      time.Duration `env:"OUTBOX_LOCK_TIMEOUT" envDefault:"5s"`
	// ReadMaxBytes bounds one read of the outbox in bytes (key, value and
	// headers of its rows): rows are read in id order until the next would
	// pass it, and always at least one, so a single larger row is still
	// read (and refused against max.message.bytes). 0 means
	// DefaultReadMaxBytes.
	ReadMaxBytes int64 `env:"OUTBOX_BATCH_MAX_BYTES" envDefault:"16777216"`
	// CreateTopics lets the relay create a topic that a row names and the
	// cluster does not have, with CreateTopicPartitions and
	// CreateTopicReplicationFactor. Off (the default), such a row is moved
	// to the dead-letter table, unless the brokers auto-create topics
	// (auto.create.topics.enable), which the relay honours.
	CreateTopics bool `env:"OUTBOX_CREATE_TOPICS" envDefault:"false"`
	// CreateTopicPartitions is the partition count of topics the relay
	// creates; -1 (or 0) takes the brokers' num.partitions.
	CreateTopicPartitions int `env:"OUTBOX_CREATE_TOPIC_PARTITIONS" envDefault:"-1"`
	// CreateTopicReplicationFactor is the replication factor of topics the
	// relay creates; -1 (or 0) takes the brokers'
	// default.replication.factor.
	CreateTopicReplicationFactor int `env:"OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR" envDefault:"-1"`
	// PollInterval is the longest an idle relay sleeps before polling when
	// no wake-up notification arrives.
	PollInterval time.Duration `env:"OUTBOX_POLL_INTERVAL" envDefault:"1s"`
	// RebalanceInterval is how often shard ownership is checked; it bounds
	// fail-over time.
	RebalanceInterval time.Duration `env:"OUTBOX_REBALANCE_INTERVAL" envDefault:"1s"`
	// OwnerLease is how long a shard owner may go without progress (frozen,
	// partitioned, a wedged worker) before a standby takes the shard over;
	// it also sets the TCP keepalives and user timeout of every relay
	// connection. 0 means 10 s. It must be longer than RebalanceInterval,
	// the period at which owners renew it.
	OwnerLease time.Duration `env:"OUTBOX_OWNER_LEASE" envDefault:"10s"`
	// MetricsAddr is where /metrics, /healthz and /readyz listen; set but
	// empty disables the HTTP server; unset means ":9090".
	MetricsAddr string `env:"OUTBOX_METRICS_ADDR"`
	// Pprof serves net/http/pprof's profiles under /debug/pprof/ on the
	// MetricsAddr listener (registered on the relay's own mux, never on
	// http.DefaultServeMux). Off by default: a profile shows the process's
	// internals, and a CPU profile costs while it runs.
	Pprof bool `env:"OUTBOX_PPROF" envDefault:"false"`
	// Delivery is the delivery mode: exactly-once, at-least-once or
	// at-most-once.
	Delivery string `env:"OUTBOX_DELIVERY" envDefault:"exactly-once"`
	// DeadLetterOrder is what a dead letter does to the later rows of its
	// topic and key: hold-key (they wait until it is requeued in place or
	// discarded; empty means hold-key) or skip (they are published without
	// it).
	DeadLetterOrder string `env:"OUTBOX_DEAD_LETTER_ORDER" envDefault:"hold-key"`
	// OnPublish is what happens to a row once published: mark (set
	// published_at and keep it; empty means mark) or delete (delete it in
	// the statement that would have marked it). Not part of the table's
	// recorded identity: see outbox.OnPublish.
	OnPublish string `env:"OUTBOX_ON_PUBLISH" envDefault:"mark"`
	// Source is where rows are read: poll (the outbox table, by id) or
	// replication (a logical replication slot of the table's inserts, in
	// commit order, package replication).
	Source string `env:"OUTBOX_SOURCE" envDefault:"poll"`
	// ReplicationSlot and ReplicationPublication name the slot (created
	// by the relay on its first start) and the publication (created by
	// `migrate up`) of OUTBOX_SOURCE=replication; empty: derived from the
	// database, schema and table.
	ReplicationSlot        string `env:"OUTBOX_REPLICATION_SLOT"`
	ReplicationPublication string `env:"OUTBOX_REPLICATION_PUBLICATION"`
	// Acks is Kafka's acks: 0, 1 or all; empty takes the mode's default
	// (all; 0 for at-most-once).
	Acks string `env:"OUTBOX_KAFKA_ACKS"`
	// EnableIdempotence is enable.idempotence; nil takes the mode's default
	// (true; false for at-most-once).
	EnableIdempotence *bool `env:"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE"`
	// MaxInFlight is max.in.flight.requests.per.connection; 0 means 5.
	MaxInFlight int `env:"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION"`
	// Retries is retries; nil takes the mode's default (2147483647, bounded
	// by delivery.timeout.ms; 0 for at-most-once).
	Retries *int `env:"OUTBOX_KAFKA_RETRIES"`
	// DeliveryTimeout is delivery.timeout.ms (env: milliseconds); 0 means
	// 120 s.
	DeliveryTimeout time.Duration `env:"-"`
	// RequestTimeout is request.timeout.ms (env: milliseconds); 0 means 30 s.
	RequestTimeout time.Duration `env:"-"`
	// TransactionTimeout is transaction.timeout.ms (env: milliseconds); 0
	// means 60 s.
	TransactionTimeout time.Duration `env:"-"`
	// Linger is linger.ms (env: milliseconds).
	Linger time.Duration `env:"-"`
	// BatchMaxBytes is batch.size as franz-go uses it: the largest record
	// batch in bytes; 0 means 1048576.
	BatchMaxBytes int `env:"OUTBOX_KAFKA_BATCH_SIZE"`
	// Compression is compression.type: none, gzip, snappy, lz4, zstd.
	Compression string `env:"OUTBOX_KAFKA_COMPRESSION_TYPE" envDefault:"none"`
	// ClientID is Kafka's client.id.
	ClientID string `env:"OUTBOX_KAFKA_CLIENT_ID" envDefault:"outbox-relay"`
	// MetricsPush is Kafka's enable.metrics.push (KIP-714); nil is
	// Kafka's default, true.
	MetricsPush *bool `env:"OUTBOX_KAFKA_ENABLE_METRICS_PUSH"`
	// AllowAtMostOnceAcks lets at-most-once run with acks other than 0
	// (it then waits for acknowledgements it cannot act on); a warning is
	// logged.
	AllowAtMostOnceAcks bool `env:"OUTBOX_AT_MOST_ONCE_ALLOW_ACKS"`
	// Retention deletes published rows this long after publication; 0 keeps
	// them forever.
	Retention time.Duration `env:"OUTBOX_RETENTION" envDefault:"168h"`
	// ShutdownTimeout bounds how long shutdown waits for the open
	// transaction to finish.
	ShutdownTimeout time.Duration `env:"OUTBOX_SHUTDOWN_TIMEOUT" envDefault:"30s"`
	// LogLevel is debug, info, warn or error.
	LogLevel string `env:"OUTBOX_LOG_LEVEL" envDefault:"info"`
	// Kafka TLS and SASL.
	KafkaTLS          bool   `env:"OUTBOX_KAFKA_TLS" envDefault:"false"`
	KafkaTLSCAFile    string `env:"OUTBOX_KAFKA_TLS_CA_FILE"`
	KafkaTLSCertFile  string `env:"OUTBOX_KAFKA_TLS_CERT_FILE"`
	KafkaTLSKeyFile   string `env:"OUTBOX_KAFKA_TLS_KEY_FILE"`
	KafkaSASLMech     string `env:"OUTBOX_KAFKA_SASL_MECHANISM"`
	KafkaSASLUser     string `env:"OUTBOX_KAFKA_SASL_USERNAME"`
	KafkaSASLPassword string `env:"OUTBOX_KAFKA_SASL_PASSWORD"`
	// KafkaOAuth configures OUTBOX_KAFKA_SASL_MECHANISM=OAUTHBEARER
	// (OUTBOX_KAFKA_SASL_OAUTHBEARER_*, package kafkaauth).
	KafkaOAuth kafkaauth.OAuth
	// DatabaseAuth are the database's short-lived credentials: a password
	// file, or RDS / Aurora IAM tokens (OUTBOX_DATABASE_PASSWORD_FILE,
	// OUTBOX_DATABASE_IAM_*, package pgauth).
	DatabaseAuth pgauth.Config
}

// KafkaAuth is the SASL part of the configuration, for kafkaauth.New.
func (c Config) KafkaAuth() kafkaauth.Config {
	return kafkaauth.Config{Mechanism: c.KafkaSASLMech, Username: c.KafkaSASLUser, Password: c.KafkaSASLPassword, OAuth: c.KafkaOAuth}
}

// DefaultOwnerLease is OUTBOX_OWNER_LEASE when Config.OwnerLease is 0.
const DefaultOwnerLease = 10 * time.Second

func (c Config) ownerLease() time.Duration {
	if c.OwnerLease == 0 {
		return DefaultOwnerLease
	}
	return c.OwnerLease
}

// MaxBatchSize is the largest OUTBOX_BATCH_SIZE.
const MaxBatchSize = 10000

// checkpointRowBytes bounds what one row costs in a checkpoint record: two
// varints of at most 10 bytes, in base64.
const checkpointRowBytes = 27

// DefaultReadMaxBytes is OUTBOX_BATCH_MAX_BYTES when it is not set: 16 MiB.
const DefaultReadMaxBytes = 16 << 20

// readMaxBytes is the byte bound of one read of the outbox.
func (c Config) readMaxBytes() int64 {
	if c.ReadMaxBytes == 0 {
		return DefaultReadMaxBytes
	}
	return c.ReadMaxBytes
}

// createTopic returns the partition count and replication factor of the
// topics the relay creates, -1 for the brokers' defaults (Kafka 2.4 and
// later, KIP-464).
func (c Config) createTopic() (partitions int32, replicationFactor int16) {
	partitions, replicationFactor = -1, -1
	if c.CreateTopicPartitions > 0 {
		partitions = int32(c.CreateTopicPartitions)
	}
	if c.CreateTopicReplicationFactor > 0 {
		replicationFactor = int16(c.CreateTopicReplicationFactor)
	}
	return partitions, replicationFactor
}

// DefaultMetricsAddr is where the HTTP endpoints listen when
// OUTBOX_METRICS_ADDR is not set.
const DefaultMetricsAddr = ":9090"

// LoadConfig reads the configuration from environ (KEY=VALUE strings, as
// os.Environ returns) and validates it. Its errors name the variable and what
// is expected, and never contain a password.
func LoadConfig(environ []string) (Config, error) {
	if err := KnownVariables().Check(environ); err != nil {
		return Config{}, err
	}
	vars := map[string]string{}
	for _, kv := range environ {
		if k, v, ok := strings.Cut(kv, "="); ok {
			vars[k] = v
		}
	}
	cfg, err := env.ParseAsWithOptions[Config](env.Options{Environment: vars})
	if err != nil {
		return Config{}, explain(err)
	}
	// caarlos0/env treats "set but empty" as unset; here empty means "off".
	if _, set := vars["OUTBOX_METRICS_ADDR"]; !set {
		cfg.MetricsAddr = DefaultMetricsAddr
	}
	// Kafka's *.ms settings, in Kafka's unit.
	var problems []string
	for _, ms := range cfg.kafkaMillis() {
		v, ok := vars[ms.name]
		if !ok || v == "" {
			continue
		}
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 {
			problems = append(problems, fmt.Sprintf("%s is %q: expected milliseconds, a non-negative integer", ms.name, v))
			continue
		}
		if n > MaxWireMillis.Milliseconds() {
			problems = append(problems, fmt.Sprintf("%s is %d: expected at most %d milliseconds (Kafka's *.ms settings are int32s)", ms.name, n, MaxWireMillis.Milliseconds()))
			continue
		}
		*ms.dst = time.Duration(n) * time.Millisecond
	}
	if len(problems) > 0 {
		return Config{}, errors.New(strings.Join(problems, "; "))
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// kafkaMillis are Kafka's *.ms settings, which LoadConfig reads by hand in
// Kafka's unit (their fields are env:"-").
func (c *Config) kafkaMillis() []struct {
	name string
	dst  *time.Duration
} {
	return []struct {
		name string
		dst  *time.Duration
	}{{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS", &c.DeliveryTimeout}, {"OUTBOX_KAFKA_REQUEST_TIMEOUT_MS", &c.RequestTimeout},
		{"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS", &c.TransactionTimeout}, {"OUTBOX_KAFKA_LINGER_MS", &c.Linger}}
}

// explain rewrites caarlos0/env errors so that each names its variable.
func explain(err error) error {
	var agg env.AggregateError
	if !errors.As(err, &agg) {
		return err
	}
	var lines []string
	for _, e := range agg.Errors {
		var (
			notSet env.VarIsNotSetError
			empty  env.EmptyVarError
			parse  env.ParseError
		)
		switch {
		case errors.As(e, &notSet):
			lines = append(lines, fmt.Sprintf("%s is not set: %s", notSet.Key, hint(notSet.Key)))
		case errors.As(e, &empty):
			lines = append(lines, fmt.Sprintf("%s is empty: %s", empty.Key, hint(empty.Key)))
		case errors.As(e, &parse):
			name := varOf(parse.Name)
			lines = append(lines, fmt.Sprintf("%s is malformed: expected %s (%v)", name, expected(parse.Type), parse.Err))
		default:
			lines = append(lines, e.Error())
		}
	}
	return errors.New(strings.Join(lines, "; "))
}

func varOf(field string) string {
	f, ok := reflect.TypeFor[Config]().FieldByName(field)
	if !ok {
		return field
	}
	name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
	return name
}

func expected(t reflect.Type) string {
	if t.Kind() == reflect.Pointer { // *bool, *int: optional settings
		t = t.Elem()
	}
	switch {
	case t == reflect.TypeFor[time.Duration]():
		return "a duration such as 500ms, 2s or 1m"
	case t.Kind() >= reflect.Int && t.Kind() <= reflect.Int64:
		return "an integer"
	case t.Kind() == reflect.Bool:
		return "true or false"
	}
	return t.String()
}

func hint(key string) string {
	switch key {
	case "OUTBOX_DATABASE_URL":
		return "set it to the PostgreSQL URL, e.g. postgres://user@host:5432/db?sslmode=require"
	case "OUTBOX_KAFKA_BROKERS":
		return "set it to the Kafka seed brokers, e.g. kafka-1:9092,kafka-2:9092"
	}
	return "set it"
}

// Validate checks values the types alone do not.
func (c Config) Validate() error {
	var problems []string
	add := func(f string, a ...any) { problems = append(problems, fmt.Sprintf(f, a...)) }
	if cc, err := pgx.ParseConfig(c.DatabaseURL); err != nil {
		add("OUTBOX_DATABASE_URL is malformed: expected a PostgreSQL URL or key=value string (%s)", parseProblem(err, c.DatabaseURL))
	} else if hosts := dbHosts(cc); len(hosts) > 1 && cc.ValidateConnect == nil {
		add("OUTBOX_DATABASE_URL names several hosts (%s) without target_session_attrs=read-write: the relay could connect to a read-only standby; add target_session_attrs=read-write (or primary)",
			strings.Join(hosts, ", "))
	}
	for _, b := range c.KafkaBrokers {
		if b == "" || !strings.Contains(b, ":") {
			add("OUTBOX_KAFKA_BROKERS has %q: expected host:port, comma-separated", b)
		}
	}
	if err := migrations.CheckNames(c.Schema, c.Table); err != nil {
		add("%v", err)
	}
	if c.RelayName == "" {
		add("OUTBOX_RELAY_NAME is empty: set it to the transactional id prefix, e.g. payments-relay")
	}
	if err := outbox.ValidTopic(c.CheckpointTopic); err != nil {
		add("OUTBOX_CHECKPOINT_TOPIC: %v", err)
	}
	if c.Shards < 1 || c.Shards > 1024 {
		add("OUTBOX_SHARDS is %d: expected 1 to 1024", c.Shards)
	}
	// The checkpoint record lists at least the batch's rows (at most 27
	// bytes each, about 6 in practice): 10000 keeps it far below Kafka's
	// default max.message.bytes of 1 MiB.
	if c.BatchSize < 1 || c.BatchSize > MaxBatchSize {
		add("OUTBOX_BATCH_SIZE is %d: expected 1 to %d", c.BatchSize, MaxBatchSize)
	}
	if c.RecoveryWindow < 1 || c.RecoveryWindow > 1000 {
		add("OUTBOX_RECOVERY_WINDOW is %d: expected 1 to 1000 batches", c.RecoveryWindow)
	}
	if _, err := outbox.ParseDeadLetterOrder(c.DeadLetterOrder); err != nil {
		add("OUTBOX_DEAD_LETTER_ORDER: %v", err)
	}
	switch c.Source {
	case "poll", "":
	case "replication":
		if c.Shards > 1 {
			add("OUTBOX_SOURCE=replication reads one slot in commit order: it needs OUTBOX_SHARDS=1 (now %d)", c.Shards)
		}
		if c.Delivery != "" && c.Delivery != "exactly-once" {
			add("OUTBOX_SOURCE=replication supports OUTBOX_DELIVERY=exactly-once only (now %q)", c.Delivery)
		}
		if c.OnPublish != "" && c.OnPublish != "mark" {
			add("OUTBOX_SOURCE=replication needs OUTBOX_ON_PUBLISH=mark (its hand-over from the poll read tells the rows it published by their marks; now %q)", c.OnPublish)
		}
		if c.DeadLetterOrder != "skip" {
			add("OUTBOX_SOURCE=replication does not hold the later rows of a dead letter's key yet: set OUTBOX_DEAD_LETTER_ORDER=skip (now %q)", c.DeadLetterOrder)
		}
	default:
		add("OUTBOX_SOURCE is %q: expected poll or replication", c.Source)
	}
	if _, err := outbox.ParseOnPublish(c.OnPublish); err != nil {
		add("OUTBOX_ON_PUBLISH: %v", err)
	}
	if c.ReadMaxBytes < 0 {
		add("OUTBOX_BATCH_MAX_BYTES is %d: expected a positive number of bytes (default %d, 16 MiB)", c.ReadMaxBytes, DefaultReadMaxBytes)
	}
	if c.CreateTopicPartitions < -1 || c.CreateTopicPartitions > 1000000 {
		add("OUTBOX_CREATE_TOPIC_PARTITIONS is %d: expected -1 (the brokers' num.partitions) or a partition count from 1 to 1000000", c.CreateTopicPartitions)
	}
	if c.CreateTopicReplicationFactor < -1 || c.CreateTopicReplicationFactor > 32767 {
		add("OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR is %d: expected -1 (the brokers' default.replication.factor) or a replication factor from 1 to 32767", c.CreateTopicReplicationFactor)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"OUTBOX_POLL_INTERVAL", c.PollInterval}, {"OUTBOX_REBALANCE_INTERVAL", c.RebalanceInterval},
		{"OUTBOX_SHUTDOWN_TIMEOUT", c.ShutdownTimeout}, {"OUTBOX_STATEMENT_TIMEOUT", c.StatementTimeout}, {"OUTBOX_LOCK_TIMEOUT", c.LockTimeout}} {
		if d.v <= 0 {
			add("%s is %v: expected a positive duration", d.name, d.v)
		}
	}
	if l := c.ownerLease(); l < time.Second || l <= c.RebalanceInterval {
		add("OUTBOX_OWNER_LEASE is %v: expected at least 1s and more than OUTBOX_REBALANCE_INTERVAL (%v), the period at which owners renew it; a few intervals is safer",
			c.OwnerLease, c.RebalanceInterval)
	}
	if c.Retention < 0 {
		add("OUTBOX_RETENTION is %v: expected 0 (keep forever) or a positive duration", c.Retention)
	}
	switch strings.ToLower(c.LogLevel) {
	case "debug", "info", "warn", "error":
	default:
		add("OUTBOX_LOG_LEVEL is %q: expected debug, info, warn or error", c.LogLevel)
	}
	problems = append(problems, c.KafkaAuth().Validate()...)
	problems = append(problems, c.DatabaseAuth.Validate()...)
	problems = append(problems, c.limitProblems()...)
	if (c.KafkaTLSCertFile == "") != (c.KafkaTLSKeyFile == "") {
		add("OUTBOX_KAFKA_TLS_CERT_FILE and OUTBOX_KAFKA_TLS_KEY_FILE must be set together")
	}
	if s, _, err := c.Settings(); err != nil {
		add("%v", err)
	} else if need := c.BatchSize*checkpointRowBytes + 1024; s.Mode.Transactional() && need > int(s.BatchMaxBytes) {
		add("OUTBOX_BATCH_SIZE=%d needs checkpoint records of up to %d bytes, more than OUTBOX_KAFKA_BATCH_SIZE=%d (batch.size): lower OUTBOX_BATCH_SIZE or raise OUTBOX_KAFKA_BATCH_SIZE",
			c.BatchSize, need, s.BatchMaxBytes)
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// dbHosts returns the distinct host:port pairs a connection may go to.
func dbHosts(cc *pgx.ConnConfig) []string {
	seen := map[string]bool{}
	var hosts []string
	add := func(h string, p uint16) {
		hp := h + ":" + strconv.Itoa(int(p))
		if !seen[hp] {
			seen[hp] = true
			hosts = append(hosts, hp)
		}
	}
	add(cc.Host, cc.Port)
	for _, f := range cc.Fallbacks {
		add(f.Host, f.Port)
	}
	return hosts
}

// redactErr returns err's text with the password of dsn, if any, removed.
func redactErr(err error, dsn string) string {
	msg := err.Error()
	if u, perr := url.Parse(dsn); perr == nil && u.User != nil {
		if pw, ok := u.User.Password(); ok && pw != "" {
			msg = strings.ReplaceAll(msg, pw, "xxxxx")
		}
	}
	if i := strings.Index(dsn, "password="); i >= 0 {
		pw, _, _ := strings.Cut(dsn[i+len("password="):], " ")
		if pw != "" {
			msg = strings.ReplaceAll(msg, pw, "xxxxx")
		}
	}
	return msg
}

// RedactURL returns the database URL without its password, for logs.
func RedactURL(dsn string) string {
	if safe, _, _, ok := splitURLPassword(dsn); ok {
		return safe
	}
	return "(key=value connection string)"
}

// Settings resolves the delivery mode and the producer settings (the mode's
// safe defaults where a setting is not given) and refuses every combination
// that would silently weaken the mode's guarantee, with the setting and the
// fix. The warnings are for combinations allowed by an explicit override.
func (c Config) Settings() (txn.Settings, []string, error) {
	delivery := c.Delivery
	if delivery == "" {
		delivery = string(txn.ExactlyOnce)
	}
	mode, err := txn.ParseMode(delivery)
	if err != nil {
		return txn.Settings{}, nil, fmt.Errorf("OUTBOX_DELIVERY: %w", err)
	}
	s := txn.DefaultSettings(mode)
	var problems, warnings []string
	bad := func(f string, a ...any) { problems = append(problems, fmt.Sprintf(f, a...)) }

	switch strings.ToLower(c.Acks) {
	case "":
	case "all", "-1":
		s.Acks = txn.AcksAll
	case "1":
		s.Acks = 1
	case "0":
		s.Acks = 0
	default:
		bad("OUTBOX_KAFKA_ACKS (acks) is %q: expected 0, 1 or all", c.Acks)
	}
	if c.EnableIdempotence != nil {
		s.Idempotence = *c.EnableIdempotence
	} else if s.Acks != txn.AcksAll {
		s.Idempotence = false // Kafka's rule: acks other than all turns idempotence off by default
	}
	if c.MaxInFlight != 0 {
		s.MaxInFlight = c.MaxInFlight
	}
	if c.Retries != nil {
		s.Retries = *c.Retries
	}
	for _, d := range []struct {
		dst *time.Duration
		v   time.Duration
	}{{&s.DeliveryTimeout, c.DeliveryTimeout}, {&s.RequestTimeout, c.RequestTimeout}, {&s.TransactionTimeout, c.TransactionTimeout}} {
		if d.v != 0 {
			*d.dst = d.v
		}
	}
	s.Linger = c.Linger
	if c.BatchMaxBytes != 0 {
		s.BatchMaxBytes = int32(min(c.BatchMaxBytes, 1<<30))
	}
	if c.Compression != "" {
		s.Compression = strings.ToLower(c.Compression)
	}
	if c.ClientID != "" {
		s.ClientID = c.ClientID
	}
	if c.MetricsPush != nil {
		s.MetricsPush = *c.MetricsPush
	}

	acks := map[int]string{txn.AcksAll: "all", 0: "0", 1: "1"}[s.Acks]
	switch {
	case s.MaxInFlight < 1:
		bad("OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION (max.in.flight.requests.per.connection) is %d: expected at least 1", s.MaxInFlight)
	case s.Retries < 0:
		bad("OUTBOX_KAFKA_RETRIES (retries) is %d: expected 0 or more", s.Retries)
	case c.BatchMaxBytes < 0:
		bad("OUTBOX_KAFKA_BATCH_SIZE (batch.size) is %d: expected a positive number of bytes", c.BatchMaxBytes)
	case c.DeliveryTimeout < 0 || c.RequestTimeout < 0 || c.TransactionTimeout < 0 || c.Linger < 0:
		bad("Kafka timeouts must not be negative")
	}
	switch s.Compression {
	case "none", "gzip", "snappy", "lz4", "zstd":
	default:
		bad("OUTBOX_KAFKA_COMPRESSION_TYPE (compression.type) is %q: expected none, gzip, snappy, lz4 or zstd", c.Compression)
	}
	switch mode {
	case txn.ExactlyOnce:
		if s.Acks != txn.AcksAll {
			bad("OUTBOX_KAFKA_ACKS=%s (acks) contradicts OUTBOX_DELIVERY=exactly-once: transactions need acks=all; unset OUTBOX_KAFKA_ACKS or set it to all", acks)
		}
		// Only when set: with acks other than all it is off by default,
		// and the acks line above already says the fix.
		if !s.Idempotence && c.EnableIdempotence != nil {
			bad("OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false (enable.idempotence) contradicts OUTBOX_DELIVERY=exactly-once: transactions need the idempotent producer; unset it or set it to true")
		}
		if s.Retries == 0 {
			bad("OUTBOX_KAFKA_RETRIES=0 (retries) contradicts OUTBOX_DELIVERY=exactly-once: the idempotent producer needs retries; unset it")
		}
	case txn.AtLeastOnce:
		if s.Acks != txn.AcksAll {
			bad("OUTBOX_KAFKA_ACKS=%s (acks) contradicts OUTBOX_DELIVERY=at-least-once: a leader fail-over can lose records acknowledged by one broker only; set acks=all, or choose OUTBOX_DELIVERY=at-most-once", acks)
		}
	case txn.AtMostOnce:
		if s.Acks != 0 {
			if !c.AllowAtMostOnceAcks {
				bad("OUTBOX_KAFKA_ACKS=%s (acks) with OUTBOX_DELIVERY=at-most-once: at-most-once is acks=0; unset OUTBOX_KAFKA_ACKS, or set OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true to wait for acknowledgements anyway", acks)
			} else {
				warnings = append(warnings, fmt.Sprintf("at-most-once with acks=%s (OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true): rows are still marked before sending, and a failed send is still a loss", acks))
			}
		}
		if s.Retries > 0 {
			bad("OUTBOX_KAFKA_RETRIES=%d (retries) contradicts OUTBOX_DELIVERY=at-most-once: a retried send can duplicate; unset it or set it to 0", s.Retries)
		}
	}
	if s.Idempotence {
		if s.Retries == 0 && mode != txn.ExactlyOnce {
			bad("OUTBOX_KAFKA_RETRIES=0 (retries) with idempotence on: the idempotent producer needs retries; unset OUTBOX_KAFKA_RETRIES or set OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false")
		}
		if s.Acks != txn.AcksAll {
			bad("OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true (enable.idempotence) needs acks=all, but OUTBOX_KAFKA_ACKS is %s: set acks=all or turn idempotence off", acks)
		}
		if s.MaxInFlight > 5 {
			bad("OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=%d (max.in.flight.requests.per.connection) is more than 5, which the idempotent producer cannot keep in order; set it to 5 or less", s.MaxInFlight)
		}
	}
	if s.DeliveryTimeout < s.Linger+s.RequestTimeout {
		bad("OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS (delivery.timeout.ms) is %d, less than linger.ms + request.timeout.ms = %d: raise it to at least %d",
			s.DeliveryTimeout.Milliseconds(), (s.Linger + s.RequestTimeout).Milliseconds(), (s.Linger + s.RequestTimeout).Milliseconds())
	}
	if len(problems) > 0 {
		return txn.Settings{}, nil, errors.New(strings.Join(problems, "; "))
	}
	return s, warnings, nil
}
