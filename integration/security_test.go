package integration

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strconv"
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
	seen := securityConsume(t, c.ListenAddrs(), len(ids), kgo.SASL(scram.Auth{User: "relay", Pass: "right-password"}.AsSha256Mechanism()))
	testenv.CheckExactlyOnce(t, ids, seen)
}

// securityConsume reads topic payments with read_committed over the given
// security options until n records arrived (or 30 s passed).
func securityConsume(t *testing.T, brokers []string, n int, opts ...kgo.Opt) []testenv.Seen {
	t.Helper()
	cons, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(brokers...), kgo.ConsumeTopics("payments"),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart())}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	defer cons.Close()
	var seen []testenv.Seen
	deadline := time.Now().Add(30 * time.Second)
	for len(seen) < n && time.Now().Before(deadline) {
		pctx, cancel := context.WithTimeout(context.Background(), time.Second)
		cons.PollFetches(pctx).EachRecord(func(r *kgo.Record) {
			s := testenv.Seen{Topic: r.Topic, Partition: r.Partition, Key: r.Key}
			for _, h := range r.Headers {
				if h.Key == "outbox-id" {
					s.ID, _ = strconv.ParseInt(string(h.Value), 10, 64)
				}
			}
			seen = append(seen, s)
		})
		cancel()
	}
	return seen
}

// TestTLSToKafka: with OUTBOX_KAFKA_TLS_CA_FILE the relay verifies the
// brokers' certificate and publishes exactly once; without the CA (system
// roots only) it refuses the unknown certificate and stops at start-up.
func TestTLSToKafka(t *testing.T) {
	if testenv.RealBrokers() != nil {
		t.Skip("TLS test serves its own certificate from kfake; against KAFKA_BROKERS, set OUTBOX_KAFKA_TLS_* and run the other tests instead")
	}
	caFile, serverCfg := tlsFixture(t)
	c, err := kfake.NewCluster(kfake.NumBrokers(1), kfake.TLS(serverCfg), kfake.SeedTopics(1, "payments"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(c.Close)
	db := testenv.NewDB(t)
	ids := db.Insert(t, "payments", 20, []string{"k"})
	k := &testenv.Kafka{Brokers: c.ListenAddrs(), Cluster: c}

	cfg := testenv.RelayConfig(db, k)
	cfg.KafkaTLS = true
	opts, err := relay.KafkaOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	untrusted := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithKafkaOptions(opts...))
	if err := untrusted.Wait(t, 60*time.Second); err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("relay without the CA returned %v, want a certificate error", err)
	}

	cfg.KafkaTLSCAFile = caFile
	opts, err = relay.KafkaOptions(cfg)
	if err != nil {
		t.Fatal(err)
	}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithKafkaOptions(opts...))
	roots := x509.NewCertPool()
	caPEM, err := os.ReadFile(caFile)
	if err != nil || !roots.AppendCertsFromPEM(caPEM) {
		t.Fatalf("read CA: %v", err)
	}
	seen := securityConsume(t, c.ListenAddrs(), len(ids), kgo.DialTLSConfig(&tls.Config{RootCAs: roots, MinVersion: tls.VersionTLS12}))
	testenv.CheckExactlyOnce(t, ids, seen)
}

// tlsFixture makes a CA, writes it to a PEM file, and returns the file and a
// server configuration with a certificate for 127.0.0.1 signed by it.
func tlsFixture(t *testing.T) (string, *tls.Config) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "outbox-relay test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	srvKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	srvTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "127.0.0.1"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	srvDER, err := x509.CreateCertificate(rand.Reader, srvTmpl, caCert, &srvKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o600); err != nil {
		t.Fatal(err)
	}
	return caFile, &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}}, MinVersion: tls.VersionTLS12}
}
