package relay

import (
	"strings"
	"testing"
)

// TestUnknownVariablesAreRefused (issue 21 §3): a misspelt OUTBOX_*
// variable, or one the README's naming rule invites but the relay does not
// read, stops start-up with the name the operator meant.
func TestUnknownVariablesAreRefused(t *testing.T) {
	for bad, want := range map[string]string{
		"OUTBOX_BATCHSIZE":              "OUTBOX_BATCH_SIZE",
		"OUTBOX_KAFKA_BROKER":           "OUTBOX_KAFKA_BROKERS",
		"OUTBOX_SHARD":                  "OUTBOX_SHARDS",
		"OUTBOX_KAFKA_SASL_MECHANISMS":  "OUTBOX_KAFKA_SASL_MECHANISM",
		"OUTBOX_KAFKA_MAX_REQUEST_SIZE": "OUTBOX_KAFKA_BATCH_SIZE",
	} {
		_, err := LoadConfig(append(base(), bad+"=1"))
		if err == nil {
			t.Errorf("%s=1 is accepted: expected it refused with did you mean %s", bad, want)
			continue
		}
		if msg := err.Error(); !strings.Contains(msg, bad) || !strings.Contains(msg, "did you mean "+want) {
			t.Errorf("%s=1: error %q does not name it and say did you mean %s", bad, msg, want)
		}
	}
}

// TestExemptVariablesAreAccepted: the variables of tests and soaks, and
// those Kubernetes sets for a Service named outbox-relay-metrics in the
// pod's namespace (service links), are not the relay's and do not stop it.
func TestExemptVariablesAreAccepted(t *testing.T) {
	env := append(base(), "OUTBOX_TEST_X=1", "OUTBOX_BENCH_RELAY_BIN=/x", "OUTBOX_KILL_ROUNDS=3", "OUTBOX_INBOX_KILL_ROUNDS=2",
		"OUTBOX_ADV_ROUNDS=2", "OUTBOX_PG_PORT=5432",
		"OUTBOX_RELAY_METRICS_SERVICE_HOST=10.0.0.1", "OUTBOX_RELAY_METRICS_SERVICE_PORT=9090", "OUTBOX_RELAY_METRICS_SERVICE_PORT_METRICS=9090",
		"OUTBOX_RELAY_METRICS_PORT=tcp://10.0.0.1:9090", "OUTBOX_RELAY_METRICS_PORT_9090_TCP=tcp://10.0.0.1:9090",
		"OUTBOX_RELAY_METRICS_PORT_9090_TCP_PROTO=tcp", "OUTBOX_RELAY_METRICS_PORT_9090_TCP_PORT=9090", "OUTBOX_RELAY_METRICS_PORT_9090_TCP_ADDR=10.0.0.1")
	if _, err := LoadConfig(env); err != nil {
		t.Fatal(err)
	}
}

// TestSASLCredentialsWithoutMechanismAreRefused (issue 21 §3): a user name
// or password without OUTBOX_KAFKA_SASL_MECHANISM would connect without
// authenticating.
func TestSASLCredentialsWithoutMechanismAreRefused(t *testing.T) {
	for _, extra := range [][]string{
		{"OUTBOX_KAFKA_SASL_USERNAME=relay", "OUTBOX_KAFKA_SASL_PASSWORD=hunter2-secret"},
		{"OUTBOX_KAFKA_SASL_PASSWORD=hunter2-secret"},
		{"OUTBOX_KAFKA_SASL_MECHANISM=SCRAM-SHA-512", "OUTBOX_KAFKA_SASL_USERNAME=relay"},
	} {
		_, err := LoadConfig(append(base(), extra...))
		if err == nil {
			t.Errorf("%v is accepted", extra)
			continue
		}
		msg := err.Error()
		if !strings.Contains(msg, "OUTBOX_KAFKA_SASL_") || strings.Contains(msg, "hunter2") {
			t.Errorf("%v: error %q does not name the variable, or shows the password", extra, msg)
		}
	}
}

// TestSettingsBeyondKafkaLimitsAreRefused (issue 21 §3): a duration or size
// beyond what Kafka's protocol or franz-go accepts stops start-up, naming
// the variable and the range, instead of failing every batch later.
func TestSettingsBeyondKafkaLimitsAreRefused(t *testing.T) {
	for _, c := range []struct{ env, want string }{
		{"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=999999999999", "OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS"},
		{"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=2147483648", "OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS"},
		{"OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=2147483648", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS"},
		{"OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=50", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS"},
		{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS=999999999999", "OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS"},
		{"OUTBOX_KAFKA_LINGER_MS=120000", "OUTBOX_KAFKA_LINGER_MS"},
		{"OUTBOX_KAFKA_BATCH_SIZE=209715200", "OUTBOX_KAFKA_BATCH_SIZE"},
		{"OUTBOX_KAFKA_BATCH_SIZE=100", "OUTBOX_KAFKA_BATCH_SIZE"},
		{"OUTBOX_KAFKA_CLIENT_ID=" + strings.Repeat("c", 300), "OUTBOX_KAFKA_CLIENT_ID"},
		{"OUTBOX_RELAY_NAME=" + strings.Repeat("r", 17000), "OUTBOX_RELAY_NAME"},
		{"OUTBOX_STATEMENT_TIMEOUT=900h", "OUTBOX_STATEMENT_TIMEOUT"},
		{"OUTBOX_LOCK_TIMEOUT=500us", "OUTBOX_LOCK_TIMEOUT"},
		{"OUTBOX_OWNER_LEASE=900h", "OUTBOX_OWNER_LEASE"},
	} {
		_, err := LoadConfig(append(base(), c.env))
		if err == nil {
			t.Errorf("%.80s is accepted", c.env)
			continue
		}
		if !strings.Contains(err.Error(), c.want) {
			t.Errorf("%.80s: error %q does not name %s", c.env, err, c.want)
		}
	}
}

// TestDatabaseURLPasswordNeverLeaks (issue 21 §3): a password with the
// characters a URL reserves (@ : / %), left unescaped, is malformed; the
// error says how to escape it and shows no part of it.
func TestDatabaseURLPasswordNeverLeaks(t *testing.T) {
	for _, pw := range []string{"p@ss:w0rd", "se/cr@t", "100%qz:y7", "a:b@c:d@e", "p@ss"} {
		u := "postgres://relay:" + pw + "@db.internal:5432/app?sslmode=require"
		_, err := LoadConfig([]string{"OUTBOX_DATABASE_URL=" + u, "OUTBOX_KAFKA_BROKERS=k:1"})
		var msg string
		if err != nil {
			msg = err.Error()
		}
		msg += " " + RedactURL(u)
		for _, part := range leakParts(pw) {
			if strings.Contains(msg, part) {
				t.Errorf("password %q: %q shows %q of it", pw, msg, part)
			}
		}
	}
}

// leakParts returns the pieces of pw that betray it: every run of three
// characters, and every pair holding an '@' (pgx's redaction left "@ss:"
// of "p@ss:w0rd").
func leakParts(pw string) []string {
	var out []string
	for i := 0; i+2 <= len(pw); i++ {
		if i+3 <= len(pw) {
			out = append(out, pw[i:i+3])
		}
		if strings.Contains(pw[i:i+2], "@") {
			out = append(out, pw[i:i+2])
		}
	}
	return out
}
