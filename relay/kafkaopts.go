package relay

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"os"
	"strings"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/sasl/plain"
	"github.com/twmb/franz-go/pkg/sasl/scram"
)

// KafkaOptions turns the TLS and SASL settings of cfg into franz-go options.
func KafkaOptions(cfg Config) ([]kgo.Opt, error) {
	var opts []kgo.Opt
	if cfg.KafkaTLS || cfg.KafkaTLSCAFile != "" || cfg.KafkaTLSCertFile != "" {
		tc := &tls.Config{MinVersion: tls.VersionTLS12}
		if cfg.KafkaTLSCAFile != "" {
			pem, err := os.ReadFile(cfg.KafkaTLSCAFile)
			if err != nil {
				return nil, fmt.Errorf("OUTBOX_KAFKA_TLS_CA_FILE: %w", err)
			}
			tc.RootCAs = x509.NewCertPool()
			if !tc.RootCAs.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("OUTBOX_KAFKA_TLS_CA_FILE %s: no PEM certificate found", cfg.KafkaTLSCAFile)
			}
		}
		if cfg.KafkaTLSCertFile != "" {
			cert, err := tls.LoadX509KeyPair(cfg.KafkaTLSCertFile, cfg.KafkaTLSKeyFile)
			if err != nil {
				return nil, fmt.Errorf("OUTBOX_KAFKA_TLS_CERT_FILE / OUTBOX_KAFKA_TLS_KEY_FILE: %w", err)
			}
			tc.Certificates = []tls.Certificate{cert}
		}
		opts = append(opts, kgo.DialTLSConfig(tc))
	}
	switch strings.ToUpper(cfg.KafkaSASLMech) {
	case "":
	case "PLAIN":
		opts = append(opts, kgo.SASL(plain.Auth{User: cfg.KafkaSASLUser, Pass: cfg.KafkaSASLPassword}.AsMechanism()))
	case "SCRAM-SHA-256":
		opts = append(opts, kgo.SASL(scram.Auth{User: cfg.KafkaSASLUser, Pass: cfg.KafkaSASLPassword}.AsSha256Mechanism()))
	case "SCRAM-SHA-512":
		opts = append(opts, kgo.SASL(scram.Auth{User: cfg.KafkaSASLUser, Pass: cfg.KafkaSASLPassword}.AsSha512Mechanism()))
	default:
		return nil, fmt.Errorf("OUTBOX_KAFKA_SASL_MECHANISM is %q: expected PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512", cfg.KafkaSASLMech)
	}
	return opts, nil
}
