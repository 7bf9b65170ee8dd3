package integration

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// startFails runs a relay with cfg and returns what Run returned, or fails
// the test when the relay is still running (and says whether it answered
// ready) after timeout.
func startFails(t *testing.T, db *testenv.DB, cfg relay.Config, timeout time.Duration, opts ...relay.Option) error {
	t.Helper()
	r, err := relay.New(cfg, db.Pool, opts...)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Run returned nil: the relay stopped without an error")
		}
		t.Logf("start error: %v", err)
		return err
	case <-time.After(timeout):
		ready := r.Ready()
		cancel()
		<-done
		t.Fatalf("the relay still runs %v after start (ready=%v): expected it to refuse at start", timeout, ready)
		return nil
	}
}

// TestTransactionTimeoutAboveTheBrokersMaxIsRefusedAtStart (issue 21 §3): a
// transaction.timeout.ms above the brokers' transaction.max.timeout.ms
// makes every InitProducerID fail with INVALID_TRANSACTION_TIMEOUT; the
// relay reads the brokers' limit at start and refuses, naming both.
func TestTransactionTimeoutAboveTheBrokersMaxIsRefusedAtStart(t *testing.T) {
	db := testenv.NewDB(t)
	var k *testenv.Kafka
	brokerMax := 5 * time.Second
	if testenv.RealBrokers() != nil {
		k = testenv.NewKafka(t, 1)
		adm := k.Admin(t)
		rc, err := adm.DescribeBrokerConfigs(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		brokerMax = relay.DefaultTransactionMaxTimeout
		for _, r := range rc {
			for _, c := range r.Configs {
				if c.Key == "transaction.max.timeout.ms" && c.Value != nil {
					n, _ := strconv.Atoi(*c.Value)
					brokerMax = time.Duration(n) * time.Millisecond
				}
			}
		}
	} else {
		c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.BrokerConfigs(map[string]string{"transaction.max.timeout.ms": "5000"}))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(c.Close)
		k = &testenv.Kafka{Cluster: c, Brokers: c.ListenAddrs()}
	}
	topic := testenv.RandomName("payments-")
	k.CreateTopics(t, 1, topic)
	db.Insert(t, topic, 3, nil)
	cfg := testenv.RelayConfig(db, k)
	cfg.TransactionTimeout = brokerMax + time.Second
	err := startFails(t, db, cfg, 30*time.Second)
	want := fmt.Sprintf("OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS is %d", cfg.TransactionTimeout.Milliseconds())
	if msg := err.Error(); !strings.Contains(msg, want) || !strings.Contains(msg, "transaction.max.timeout.ms") || !strings.Contains(msg, strconv.FormatInt(brokerMax.Milliseconds(), 10)) {
		t.Fatalf("start error %q does not say %q and the brokers' transaction.max.timeout.ms (%d)", msg, want, brokerMax.Milliseconds())
	}
}

// TestExistingCheckpointTopicMustBeCompacted (issue 21 §3): a checkpoint
// topic created by someone else with cleanup.policy=delete (or
// compact,delete with a finite retention) loses a quiet shard's last
// checkpoint after retention.ms, and with it the recovery of its unmarked
// batches. The relay refuses it at start, not only sets the policy when it
// creates the topic. (Too few partitions were refused at start already:
// "has N partitions but OUTBOX_SHARDS is M".)
func TestExistingCheckpointTopicMustBeCompacted(t *testing.T) {
	k := testenv.NewKafka(t, 1)
	for _, c := range []struct {
		name    string
		configs map[string]*string
		parts   int32
		shards  int
		want    []string
	}{
		{"delete", map[string]*string{"cleanup.policy": kadm.StringPtr("delete")}, 1, 1, []string{"cleanup.policy=delete", "compact"}},
		{"compact,delete", map[string]*string{"cleanup.policy": kadm.StringPtr("compact,delete"), "retention.ms": kadm.StringPtr("86400000")}, 1, 1, []string{"cleanup.policy=compact,delete", "retention.ms=86400000"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			db := testenv.NewDB(t)
			cfg := testenv.RelayConfig(db, k)
			cfg.Shards = c.shards
			k.CreateTopicsWithConfig(t, c.parts, c.configs, cfg.CheckpointTopic)
			err := startFails(t, db, cfg, 30*time.Second)
			for _, w := range c.want {
				if !strings.Contains(err.Error(), w) {
					t.Fatalf("start error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestKafkaWrongPasswordSaysSoInOneLine (issue 21 §3): a wrong SASL
// password stops the relay at start with one line that says the brokers
// refused the credentials, and nothing of the password.
func TestKafkaWrongPasswordSaysSoInOneLine(t *testing.T) {
	if testenv.RealBrokers() != nil {
		t.Skip("needs brokers that require SASL: kfake with EnableSASL; KAFKA_BROKERS' cluster may not")
	}
	const pw = "wr0ng-p@ss:w0rd"
	for _, mech := range []string{"PLAIN", "SCRAM-SHA-256"} {
		t.Run(mech, func(t *testing.T) {
			c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(), kfake.Superuser(mech, "relay", "the-right-one"))
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(c.Close)
			db := testenv.NewDB(t)
			k := &testenv.Kafka{Cluster: c, Brokers: c.ListenAddrs()}
			cfg := testenv.RelayConfig(db, k)
			cfg.KafkaSASLMech, cfg.KafkaSASLUser, cfg.KafkaSASLPassword = mech, "relay", pw
			kopts, err := relay.KafkaOptions(cfg)
			if err != nil {
				t.Fatal(err)
			}
			var logs testenv.SyncBuffer
			err = startFails(t, db, cfg, 60*time.Second, relay.WithKafkaOptions(kopts...), relay.WithLogger(testenv.Logger(t, &logs)))
			msg := err.Error()
			if strings.Contains(msg, "\n") || !strings.Contains(msg, "SASL") || !strings.Contains(msg, "OUTBOX_KAFKA_SASL_USERNAME") || !strings.Contains(msg, "OUTBOX_KAFKA_SASL_PASSWORD") {
				t.Errorf("start error is not one line naming SASL and the credentials' variables: %q", msg)
			}
			for _, part := range []string{"wr0ng", "p@ss", "w0rd"} {
				if strings.Contains(msg, part) || strings.Contains(logs.String(), part) {
					t.Errorf("the error or the log shows %q of the password: %q", part, msg)
				}
			}
		})
	}
}

// TestPostgresWrongPasswordIsOneLineWithTheCause (issue 21 §3): with the
// default sslmode=prefer against a server without TLS, a wrong password
// printed "server refused TLS connection" first (pgx's first attempt), and
// a failed dial twice. The error is one line with the real cause, and
// nothing of the password, whatever characters it holds.
func TestPostgresWrongPasswordIsOneLineWithTheCause(t *testing.T) {
	// Not t.TempDir: its parent is 0700, and the server runs as postgres
	// when the tests run as root.
	dir, err := os.MkdirTemp("", "outbox-hba-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	hba := filepath.Join(dir, "pg_hba.conf")
	if err := os.WriteFile(hba, []byte("local all all trust\nhost all relay 127.0.0.1/32 scram-sha-256\nhost all all 127.0.0.1/32 trust\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	pg := testenv.StartPrivatePostgres(t, "hba_file="+hba, "ssl=off")
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, pg.URL("postgres", "postgres"))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := conn.Exec(ctx, "CREATE ROLE relay LOGIN PASSWORD 'the-right-one'"); err != nil {
		t.Fatal(err)
	}
	conn.Close(ctx)
	const pw = "p@ss:w0rd/100%"
	for _, u := range []string{
		fmt.Sprintf("postgres://relay:%s@127.0.0.1:%d/postgres", "p%40ss%3Aw0rd%2F100%25", pg.Port()),
		fmt.Sprintf("host=127.0.0.1 port=%d user=relay dbname=postgres password='%s'", pg.Port(), pw),
	} {
		_, err := relay.OpenPool(ctx, u, 1, nil)
		if err == nil {
			t.Fatalf("%s: connected with a wrong password", relay.RedactURL(u))
		}
		msg := err.Error()
		t.Logf("error: %s", msg)
		if strings.Contains(msg, "\n") || strings.Contains(msg, "refused TLS") || !strings.Contains(msg, "password authentication failed") {
			t.Errorf("not one line with the cause (password authentication failed), or the TLS fallback shown: %q", msg)
		}
		for _, part := range []string{"p@ss", "w0rd", "100%", "p%40ss"} {
			if strings.Contains(msg, part) {
				t.Errorf("error shows %q of the password: %q", part, msg)
			}
		}
	}
	// A server that is not there: the dial error once.
	_, err = relay.OpenPool(ctx, "postgres://relay@127.0.0.1:1/postgres", 1, nil)
	if err == nil {
		t.Fatal("connected to port 1")
	}
	if n := strings.Count(err.Error(), "connection refused"); n != 1 {
		t.Errorf("the dial error shows %d times, want once: %q", n, err)
	}
}
