package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/scram"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestSASLToKafka: with OUTBOX_KAFKA_SASL_* set, the relay authenticates
// (SCRAM-SHA-256) and publishes exactly once; with a wrong password it stops
// at start-up with the authentication error instead of retrying forever.
func TestSASLToKafka(t *testing.T) {
	if testenv.RealBrokers() != nil {
		t.Skip("SASL test needs kfake's SASL users; against KAFKA_BROKERS, set the OUTBOX_KAFKA_SASL_* variables and run the other tests instead")
	}
	ctx := context.Background()
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.EnableSASL(), kfake.Superuser("SCRAM-SHA-256", "relay", "right-password"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	admCl, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...),
		kgo.SASL(scram.Auth{User: "relay", Pass: "right-password"}.AsSha256Mechanism()))
	if err != nil {
		t.Fatal(err)
	}
	defer admCl.Close()
	if _, err := kadm.NewClient(admCl).CreateTopic(ctx, 1, 1, nil, "payments"); err != nil {
		t.Fatal(err)
	}

	db := testenv.NewDB(t)
	ids := db.Insert(t, "payments", 20, []string{"k"})
	k := &testenv.Kafka{Brokers: c.ListenAddrs(), Cluster: c}

	cfg := testenv.RelayConfig(db, k)
	cfg.KafkaSASLMech, cfg.KafkaSASLUser, cfg.KafkaSASLPassword = "SCRAM-SHA-256", "relay", "wrong-password"
	opts, err := relay.KafkaOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	bad := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithKafkaOptions(opts...))
	err = bad.Wait(t, 60*time.Second)
	if err == nil || !strings.Contains(err.Error(), "SASL") {
		t.Fatalf("relay with a wrong password returned %v, want a SASL authentication error", err)
	}
	if strings.Contains(err.Error(), "wrong-password") {
		t.Fatalf("error shows the password: %v", err)
	}

	cfg.KafkaSASLPassword = "right-password"
	opts, err = relay.KafkaOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithKafkaOptions(opts...))
	cons, err := kgo.NewClient(kgo.SeedBrokers(c.ListenAddrs()...), kgo.ConsumeTopics("payments"),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.SASL(scram.Auth{User: "relay", Pass: "right-password"}.AsSha256Mechanism()))
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	var seen []testenv.Seen
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < len(ids) && time.Now().Before(deadline) {
		pctx, cancel := context.WithTimeout(ctx, time.Second)
		cons.PollFetches(pctx).EachRecord(func(r *kgo.Record) {
			s := testenv.Seen{Topic: r.Topic, Partition: r.Partition, Key: r.Key}
			for _, h := range r.Headers {
				if h.Key == "outbox-id" {
					s.ID = parseID(h.Value)
				}
			}
			seen = append(seen, s)
		})
		cancel()
	}
	testenv.CheckExactlyOnce(t, ids, seen)
}

func parseID(b []byte) int64 {
	var n int64
	for _, c := range b {
		n = n*10 + int64(c-'0')
	}
	return n
}
