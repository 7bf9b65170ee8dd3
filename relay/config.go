package relay

import (
	"errors"
	"fmt"
	"net/url"
	"reflect"
	"strings"
	"time"

	"github.com/caarlos0/env/v11"
	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// Config is the relay's configuration, read from environment variables.
// Every field's variable, default and meaning is in the README's
// configuration reference.
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
	// PollInterval is the longest an idle relay sleeps before polling when
	// no wake-up notification arrives.
	PollInterval time.Duration `env:"OUTBOX_POLL_INTERVAL" envDefault:"1s"`
	// RebalanceInterval is how often shard ownership is checked; it bounds
	// fail-over time.
	RebalanceInterval time.Duration `env:"OUTBOX_REBALANCE_INTERVAL" envDefault:"1s"`
	// MetricsAddr is where /metrics, /healthz and /readyz listen; set but
	// empty disables the HTTP server; unset means ":9090".
	MetricsAddr string `env:"OUTBOX_METRICS_ADDR"`
	// TransactionTimeout is Kafka's transaction.timeout.ms.
	TransactionTimeout time.Duration `env:"OUTBOX_TRANSACTION_TIMEOUT" envDefault:"60s"`
	// DeliveryTimeout is Kafka's delivery.timeout.ms.
	DeliveryTimeout time.Duration `env:"OUTBOX_DELIVERY_TIMEOUT" envDefault:"120s"`
	// ClientID is Kafka's client.id.
	ClientID string `env:"OUTBOX_KAFKA_CLIENT_ID" envDefault:"outbox-relay"`
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
}

// DefaultMetricsAddr is where the HTTP endpoints listen when
// OUTBOX_METRICS_ADDR is not set.
const DefaultMetricsAddr = ":9090"

// LoadConfig reads the configuration from environ (KEY=VALUE strings, as
// os.Environ returns) and validates it. Its errors name the variable and what
// is expected, and never contain a password.
func LoadConfig(environ []string) (Config, error) {
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
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
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
	switch {
	case t == reflect.TypeFor[time.Duration]():
		return "a duration such as 500ms, 2s or 1m"
	case t.Kind() == reflect.Int:
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
	if _, err := pgx.ParseConfig(c.DatabaseURL); err != nil {
		add("OUTBOX_DATABASE_URL is malformed: expected a PostgreSQL URL or key=value string (%s)", redactErr(err, c.DatabaseURL))
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
	if c.BatchSize < 1 || c.BatchSize > 100000 {
		add("OUTBOX_BATCH_SIZE is %d: expected 1 to 100000", c.BatchSize)
	}
	for _, d := range []struct {
		name string
		v    time.Duration
	}{{"OUTBOX_POLL_INTERVAL", c.PollInterval}, {"OUTBOX_REBALANCE_INTERVAL", c.RebalanceInterval},
		{"OUTBOX_TRANSACTION_TIMEOUT", c.TransactionTimeout}, {"OUTBOX_DELIVERY_TIMEOUT", c.DeliveryTimeout},
		{"OUTBOX_SHUTDOWN_TIMEOUT", c.ShutdownTimeout}} {
		if d.v <= 0 {
			add("%s is %v: expected a positive duration", d.name, d.v)
		}
	}
	if c.Retention < 0 {
		add("OUTBOX_RETENTION is %v: expected 0 (keep forever) or a positive duration", c.Retention)
	}
	switch strings.ToLower(c.LogLevel) {
	case "debug", "info", "warn", "error":
	default:
		add("OUTBOX_LOG_LEVEL is %q: expected debug, info, warn or error", c.LogLevel)
	}
	switch strings.ToUpper(c.KafkaSASLMech) {
	case "", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512":
	default:
		add("OUTBOX_KAFKA_SASL_MECHANISM is %q: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", c.KafkaSASLMech)
	}
	if c.KafkaSASLMech != "" && c.KafkaSASLUser == "" {
		add("OUTBOX_KAFKA_SASL_USERNAME is empty but OUTBOX_KAFKA_SASL_MECHANISM is set: set the user name")
	}
	if (c.KafkaTLSCertFile == "") != (c.KafkaTLSKeyFile == "") {
		add("OUTBOX_KAFKA_TLS_CERT_FILE and OUTBOX_KAFKA_TLS_KEY_FILE must be set together")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
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
	if u, err := url.Parse(dsn); err == nil && u.Scheme != "" {
		return u.Redacted()
	}
	return "(key=value connection string)"
}
