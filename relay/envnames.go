package relay

import "github.com/outbox-relay/outbox-relay/envnames"

// KnownVariables returns the OUTBOX_* variables the relay and its commands
// read: the env tags of Config and the Kafka *.ms settings LoadConfig reads
// by hand. Every command refuses the others at start (package envnames),
// with hints for the Kafka properties franz-go has under another name
// (named by the property, so that deploy/check does not count them as
// variables the relay reads).
func KnownVariables() envnames.Known {
	var c Config
	var extra []string
	for _, ms := range c.kafkaMillis() {
		extra = append(extra, ms.name)
	}
	return envnames.FromStructs(extra, c).
		WithHint(envnames.KafkaVariable("max.request.size"), "OUTBOX_KAFKA_BATCH_SIZE (franz-go has no max.request.size: batch.size caps every record batch, and so every record)").
		WithHint(envnames.KafkaVariable("bootstrap.servers"), "OUTBOX_KAFKA_BROKERS (bootstrap.servers)").
		WithHint(envnames.KafkaVariable("transactional.id"), "OUTBOX_RELAY_NAME (the transactional ids are <name>-<shard>)")
}
