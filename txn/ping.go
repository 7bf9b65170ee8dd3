package txn

import (
	"context"
	"fmt"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Ping reports whether this instance reaches a Kafka broker of cfg, through
// its own network path and with its own client settings (TLS, SASL): nil
// once a broker answered an ApiVersions request within ctx. The relay asks
// it before taking shards after it lost some, so that an instance cut off
// from Kafka does not take back a shard a standby could publish.
func Ping(ctx context.Context, cfg Config) error {
	opts := append([]kgo.Opt{kgo.SeedBrokers(cfg.Brokers...), kgo.WithLogger(KafkaLogger(cfg.Logger, kgo.LogLevelWarn))}, cfg.Settings.clientOpts()...)
	cl, err := kgo.NewClient(append(opts, cfg.Extra...)...)
	if err != nil {
		return fmt.Errorf("kafka probe: %w", err)
	}
	defer cl.Close()
	if err := cl.Ping(ctx); err != nil {
		return fmt.Errorf("kafka probe: %w", err)
	}
	return nil
}
