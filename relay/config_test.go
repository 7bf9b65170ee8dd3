package relay

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
)

func base() []string {
	return []string{"OUTBOX_DATABASE_URL=postgres://relay:s3cret-pw@db:5432/app", "OUTBOX_KAFKA_BROKERS=k1:9092,k2:9092"}
}

func TestConfigDefaults(t *testing.T) {
	cfg, err := LoadConfig(base())
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Table != "outbox" || cfg.Schema != "public" || cfg.BatchSize != 500 || cfg.PollInterval != time.Second ||
		cfg.Shards != 1 || len(cfg.KafkaBrokers) != 2 || cfg.MetricsAddr != ":9090" || cfg.ReadMaxBytes != 16<<20 ||
		cfg.CreateTopics || cfg.CreateTopicPartitions != -1 || cfg.CreateTopicReplicationFactor != -1 || cfg.OwnerLease != 10*time.Second ||
		cfg.OnPublish != "mark" {
		t.Fatalf("defaults: %+v", cfg)
	}
}

// TestConfigErrorsNameTheVariable: each bad value stops start-up with a line
// naming the variable and what is expected, and the password never shows.
func TestConfigErrorsNameTheVariable(t *testing.T) {
	cases := []struct {
		env  []string
		want []string
	}{
		{nil, []string{"OUTBOX_DATABASE_URL is not set", "OUTBOX_KAFKA_BROKERS is not set"}},
		{append(base(), "OUTBOX_BATCH_SIZE=lots"), []string{"OUTBOX_BATCH_SIZE is malformed: expected an integer"}},
		{append(base(), "OUTBOX_BATCH_SIZE=0"), []string{"OUTBOX_BATCH_SIZE is 0: expected 1 to 10000"}},
		{append(base(), "OUTBOX_BATCH_SIZE=20000"), []string{"OUTBOX_BATCH_SIZE is 20000: expected 1 to 10000"}},
		{append(base(), "OUTBOX_BATCH_MAX_BYTES=lots"), []string{"OUTBOX_BATCH_MAX_BYTES is malformed: expected an integer"}},
		{append(base(), "OUTBOX_BATCH_MAX_BYTES=-1"), []string{"OUTBOX_BATCH_MAX_BYTES is -1: expected a positive number of bytes"}},
		{append(base(), "OUTBOX_CREATE_TOPICS=maybe"), []string{"OUTBOX_CREATE_TOPICS is malformed: expected true or false"}},
		{append(base(), "OUTBOX_CREATE_TOPIC_PARTITIONS=-2"), []string{"OUTBOX_CREATE_TOPIC_PARTITIONS is -2: expected -1 (the brokers' num.partitions) or a partition count"}},
		{append(base(), "OUTBOX_CREATE_TOPIC_PARTITIONS=many"), []string{"OUTBOX_CREATE_TOPIC_PARTITIONS is malformed: expected an integer"}},
		{append(base(), "OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR=40000"), []string{"OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR is 40000: expected -1 (the brokers' default.replication.factor) or a replication factor from 1 to 32767"}},
		{append(base(), "OUTBOX_POLL_INTERVAL=5"), []string{"OUTBOX_POLL_INTERVAL is malformed: expected a duration"}},
		{append(base(), "OUTBOX_POLL_INTERVAL=-1s"), []string{"OUTBOX_POLL_INTERVAL is -1s: expected a positive duration"}},
		{append(base(), "OUTBOX_CHECKPOINT_TOPIC=bad topic"), []string{"OUTBOX_CHECKPOINT_TOPIC"}},
		{append(base(), "OUTBOX_TABLE="+strings.Repeat("t", 60)), []string{"shorten OUTBOX_TABLE"}},
		{append(base(), "OUTBOX_KAFKA_BROKERS=nohostport"), []string{"OUTBOX_KAFKA_BROKERS has \"nohostport\": expected host:port"}},
		{append(base(), "OUTBOX_KAFKA_SASL_MECHANISM=GSSAPI"), []string{"OUTBOX_KAFKA_SASL_MECHANISM"}},
		{append(base(), "OUTBOX_LOG_LEVEL=loud"), []string{"OUTBOX_LOG_LEVEL"}},
		{append(base(), "OUTBOX_ON_PUBLISH=remove"), []string{`OUTBOX_ON_PUBLISH: "remove" is not an on-publish action: use mark`, "or delete"}},
		{[]string{"OUTBOX_DATABASE_URL=postgres://relay:s3cret-pw@db:notaport/app", "OUTBOX_KAFKA_BROKERS=k:1"}, []string{"OUTBOX_DATABASE_URL is malformed"}},
		{append(base(), "OUTBOX_OWNER_LEASE=500ms"), []string{"OUTBOX_OWNER_LEASE is 500ms: expected at least 1s"}},
		{append(base(), "OUTBOX_OWNER_LEASE=2s", "OUTBOX_REBALANCE_INTERVAL=2s"), []string{"OUTBOX_OWNER_LEASE is 2s", "more than OUTBOX_REBALANCE_INTERVAL (2s)"}},
		{[]string{"OUTBOX_DATABASE_URL=postgres://relay:s3cret-pw@db1:5432,db2:5432/app", "OUTBOX_KAFKA_BROKERS=k:1"},
			[]string{"OUTBOX_DATABASE_URL names several hosts (db1:5432, db2:5432)", "target_session_attrs=read-write"}},
	}
	for _, c := range cases {
		_, err := LoadConfig(c.env)
		if err == nil {
			t.Errorf("%v: no error", c.env)
			continue
		}
		msg := err.Error()
		for _, w := range c.want {
			if !strings.Contains(msg, w) {
				t.Errorf("%v: error %q does not contain %q", c.env, msg, w)
			}
		}
		if strings.Contains(msg, "s3cret-pw") {
			t.Errorf("error shows the password: %q", msg)
		}
		if strings.Contains(msg, "\n") {
			t.Errorf("error is not one line: %q", msg)
		}
	}
}

func TestRedactURL(t *testing.T) {
	if got := RedactURL("postgres://relay:s3cret-pw@db:5432/app"); strings.Contains(got, "s3cret-pw") {
		t.Fatalf("RedactURL kept the password: %s", got)
	}
}

// TestMetricsAddrEmptyDisables: unset means the default port, set-but-empty
// means no HTTP server.
func TestMetricsAddrEmptyDisables(t *testing.T) {
	cfg, err := LoadConfig(append(base(), "OUTBOX_METRICS_ADDR="))
	if err != nil || cfg.MetricsAddr != "" {
		t.Fatalf("OUTBOX_METRICS_ADDR= gave %q, %v; want empty", cfg.MetricsAddr, err)
	}
	cfg, err = LoadConfig(base())
	if err != nil || cfg.MetricsAddr != DefaultMetricsAddr {
		t.Fatalf("unset OUTBOX_METRICS_ADDR gave %q, %v", cfg.MetricsAddr, err)
	}
}

// TestReservedHeaderIsTheRelaysOutboxID: the header outbox.Message refuses
// is the one the producer sets.
func TestReservedHeaderIsTheRelaysOutboxID(t *testing.T) {
	if outbox.ReservedHeader != txn.HeaderOutboxID {
		t.Fatalf("outbox.ReservedHeader = %q, txn.HeaderOutboxID = %q", outbox.ReservedHeader, txn.HeaderOutboxID)
	}
}

// TestCreateTopicSettings: the partitions and replication factor of topics
// the relay creates are the configured ones, -1 (the brokers' defaults) when
// unset or 0.
func TestCreateTopicSettings(t *testing.T) {
	cfg, err := LoadConfig(append(base(), "OUTBOX_CREATE_TOPICS=true", "OUTBOX_CREATE_TOPIC_PARTITIONS=12", "OUTBOX_CREATE_TOPIC_REPLICATION_FACTOR=3"))
	if err != nil {
		t.Fatal(err)
	}
	if p, rf := cfg.createTopic(); !cfg.CreateTopics || p != 12 || rf != 3 {
		t.Fatalf("create topics %v with %d partitions, replication %d; want true, 12, 3", cfg.CreateTopics, p, rf)
	}
	if p, rf := (Config{}).createTopic(); p != -1 || rf != -1 {
		t.Fatalf("unset: %d partitions, replication %d; want the brokers' defaults, -1 and -1", p, rf)
	}
}

// TestSeveralHostsWithReadWriteAreAccepted: target_session_attrs=read-write
// (or primary) makes a URL with several hosts safe.
func TestSeveralHostsWithReadWriteAreAccepted(t *testing.T) {
	for _, attrs := range []string{"read-write", "primary"} {
		env := []string{"OUTBOX_DATABASE_URL=postgres://relay@db1:5432,db2:5432/app?target_session_attrs=" + attrs, "OUTBOX_KAFKA_BROKERS=k:1"}
		if _, err := LoadConfig(env); err != nil {
			t.Errorf("target_session_attrs=%s: %v", attrs, err)
		}
	}
}

func TestCloudCredentialSettingsAreReadFromTheEnvironment(t *testing.T) {
	base := []string{"OUTBOX_DATABASE_URL=postgres://relay@db:5432/app", "OUTBOX_KAFKA_BROKERS=k:9092"}
	cfg, err := LoadConfig(append(base, "OUTBOX_KAFKA_SASL_MECHANISM=OAUTHBEARER",
		"OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL=https://login.example.com/token",
		"OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID=relay", "OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET_FILE=/var/run/secrets/oauth",
		"OUTBOX_KAFKA_SASL_OAUTHBEARER_SCOPE=kafka", "OUTBOX_DATABASE_PASSWORD_FILE=/var/run/secrets/db/password"))
	if err != nil {
		t.Fatal(err)
	}
	if o := cfg.KafkaAuth().OAuth; o.TokenEndpointURL != "https://login.example.com/token" || o.ClientID != "relay" ||
		o.ClientSecretFile != "/var/run/secrets/oauth" || o.Scope != "kafka" || cfg.DatabaseAuth.PasswordFile != "/var/run/secrets/db/password" {
		t.Fatalf("%+v %+v", o, cfg.DatabaseAuth)
	}
	_, err = LoadConfig(append(base, "OUTBOX_KAFKA_SASL_MECHANISM=OAUTHBEARER", "OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_SECRET=hunter2-secret",
		"OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL=https://login.example.com/token", "OUTBOX_DATABASE_IAM_AUTH=true", "OUTBOX_DATABASE_PASSWORD_FILE=/p"))
	if err == nil || !strings.Contains(err.Error(), "OUTBOX_KAFKA_SASL_OAUTHBEARER_CLIENT_ID is empty") || !strings.Contains(err.Error(), "choose one") {
		t.Fatalf("bad settings: %v", err)
	}
	if strings.Contains(err.Error(), "hunter2-secret") {
		t.Fatalf("the error shows the secret: %v", err)
	}
	if _, err := LoadConfig(append(base, "OUTBOX_KAFKA_SASL_MECHANISM=AWS_MSK_IAM")); err != nil {
		t.Fatalf("AWS_MSK_IAM needs no user name: %v", err)
	}
}
