package relay

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"os"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/kafkaauth"
)

// KafkaOptions turns the TLS and SASL settings of cfg into franz-go options.
// The SASL mechanism is package kafkaauth's: short-lived credentials (AWS
// IAM, OAuth tokens) are fetched again before they expire, on every
// authentication and re-authentication. A logger, if given, gets the
// refreshes and their failures (never a secret).
func KafkaOptions(cfg Config, log ...*slog.Logger) ([]kgo.Opt, error) {
	l := slog.New(slog.DiscardHandler)
	if len(log) > 0 && log[0] != nil {
		l = log[0]
	}
	return kafkaOptions(cfg, l)
}

func kafkaOptions(cfg Config, log *slog.Logger) ([]kgo.Opt, error) {
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
	mech, err := kafkaauth.New(context.Background(), cfg.KafkaAuth(), kafkaauth.WithLogger(log))
	if err != nil {
		return nil, err
	}
	if mech != nil {
		opts = append(opts, kgo.SASL(mech))
	}
	return opts, nil
}
