package relay

import (
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"
)

// saslWatch is a franz-go hook that sees a SASL authentication fail. A
// wrong user name or password is answered SASL_AUTHENTICATION_FAILED by
// Apache Kafka, but some brokers and proxies (kfake among them) close the
// connection instead, which the client reports to the caller as a bare EOF
// after its retries: the hook keeps the broker and the cause, so that the
// start error can say what went wrong.
type saslWatch struct {
	mu   sync.Mutex
	addr string
	err  error
}

var _ kgo.HookBrokerRead = (*saslWatch)(nil)

// OnBrokerRead implements kgo.HookBrokerRead: it notes a failed read of a
// SASLAuthenticate response.
func (w *saslWatch) OnBrokerRead(meta kgo.BrokerMetadata, key int16, _ int, _, _ time.Duration, err error) {
	if err == nil || key != int16(kmsg.SASLAuthenticate) {
		return
	}
	w.mu.Lock()
	defer w.mu.Unlock()
	w.addr, w.err = fmt.Sprintf("%s:%d", meta.Host, meta.Port), err
}

// explain returns err as the SASL failure it is, naming the mechanism, the
// user and the variables to check (never the password), or err itself when
// SASL did not fail.
func (w *saslWatch) explain(err error, cfg Config) error {
	w.mu.Lock()
	addr, readErr := w.addr, w.err
	w.mu.Unlock()
	var cause string
	switch {
	case errors.Is(err, kerr.SaslAuthenticationFailed):
		cause = "the broker answered SASL_AUTHENTICATION_FAILED"
		var ke *kerr.Error
		if errors.As(err, &ke) && ke.Message != "" {
			cause = "the broker answered " + ke.Message
		}
	case readErr != nil:
		cause = fmt.Sprintf("broker %s closed the connection during SASL authentication (%v)", addr, readErr)
	default:
		return err
	}
	// The error's own text never holds the password, but strip it anyway
	// should a broker echo it.
	msg := strings.ReplaceAll(cause, cfg.KafkaSASLPassword, "xxxxx")
	return fmt.Errorf("Kafka refused the SASL credentials: %s %s authentication of user %q failed: %s; check OUTBOX_KAFKA_SASL_USERNAME and OUTBOX_KAFKA_SASL_PASSWORD, and that the brokers' listener takes OUTBOX_KAFKA_SASL_MECHANISM=%s",
		strings.ToUpper(cfg.KafkaSASLMech), "SASL", cfg.KafkaSASLUser, msg, strings.ToUpper(cfg.KafkaSASLMech))
}
