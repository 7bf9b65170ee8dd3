package relay

// The delivery modes and their producer settings: every combination that
// would silently weaken the chosen mode is refused at start-up with one line
// naming the variable, Kafka's name for the setting, and the fix; what is
// not set takes the mode's safe default.

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/txn"
)

// settingsFor loads the configuration of base() plus env and resolves its
// producer settings.
func settingsFor(t *testing.T, env ...string) (txn.Settings, []string, error) {
	t.Helper()
	cfg, err := LoadConfig(append(base(), env...))
	if err != nil {
		return txn.Settings{}, nil, err
	}
	return cfg.Settings()
}

// TestSettingsDefaultsPerMode: unset settings take the mode's safe defaults,
// with Kafka's values: acks=all, idempotence on, 5 in flight, retries
// MAX_INT bounded by delivery.timeout.ms=120 s; at-most-once is acks=0,
// idempotence off, no retries.
func TestSettingsDefaultsPerMode(t *testing.T) {
	safe := txn.Settings{
		Acks: txn.AcksAll, Idempotence: true, MaxInFlight: 5, Retries: 2147483647,
		DeliveryTimeout: 120 * time.Second, RequestTimeout: 30 * time.Second, TransactionTimeout: 60 * time.Second,
		Linger: 0, BatchMaxBytes: 1048576, Compression: "none", ClientID: "outbox-relay", MetricsPush: true,
	}
	exactlyOnce, atLeastOnce, atMostOnce := safe, safe, safe
	exactlyOnce.Mode, atLeastOnce.Mode, atMostOnce.Mode = txn.ExactlyOnce, txn.AtLeastOnce, txn.AtMostOnce
	atMostOnce.Acks, atMostOnce.Idempotence, atMostOnce.Retries = 0, false, 0

	cases := []struct {
		env  []string
		want txn.Settings
	}{
		{nil, exactlyOnce},
		{[]string{"OUTBOX_DELIVERY=exactly-once"}, exactlyOnce},
		{[]string{"OUTBOX_DELIVERY=at-least-once"}, atLeastOnce},
		{[]string{"OUTBOX_DELIVERY=at-most-once"}, atMostOnce},
	}
	for _, c := range cases {
		got, warnings, err := settingsFor(t, c.env...)
		if err != nil {
			t.Errorf("%v: %v", c.env, err)
			continue
		}
		if got != c.want {
			t.Errorf("%v: settings\n got %+v\nwant %+v", c.env, got, c.want)
		}
		if len(warnings) > 0 {
			t.Errorf("%v: warnings %q for the defaults", c.env, warnings)
		}
	}

	// A Config built in code (no envDefault) with Delivery "" is
	// exactly-once, with the same defaults.
	got, _, err := Config{}.Settings()
	if err != nil || got != exactlyOnce {
		t.Fatalf("Config{}.Settings() = %+v, %v; want exactly-once defaults %+v", got, err, exactlyOnce)
	}
	if !got.Mode.Transactional() {
		t.Fatal("the default mode is not transactional")
	}
}

// TestSettingsRefusals: each combination that contradicts the mode, or a
// value Kafka would not take, stops start-up with one line naming the
// variable, the Kafka setting, and the fix.
func TestSettingsRefusals(t *testing.T) {
	cases := []struct {
		name string
		env  []string
		want []string
	}{
		{"exactly-once with acks=1", []string{"OUTBOX_KAFKA_ACKS=1"},
			[]string{"OUTBOX_KAFKA_ACKS=1 (acks) contradicts OUTBOX_DELIVERY=exactly-once", "unset OUTBOX_KAFKA_ACKS or set it to all"}},
		{"exactly-once with acks=0", []string{"OUTBOX_DELIVERY=exactly-once", "OUTBOX_KAFKA_ACKS=0"},
			[]string{"OUTBOX_KAFKA_ACKS=0 (acks) contradicts OUTBOX_DELIVERY=exactly-once", "set it to all"}},
		{"exactly-once with idempotence off", []string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false"},
			[]string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false (enable.idempotence) contradicts OUTBOX_DELIVERY=exactly-once", "set it to true"}},
		{"exactly-once with 6 in flight", []string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6"},
			[]string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6 (max.in.flight.requests.per.connection)", "set it to 5 or less"}},
		{"exactly-once with retries=0", []string{"OUTBOX_KAFKA_RETRIES=0"},
			[]string{"OUTBOX_KAFKA_RETRIES=0 (retries) contradicts OUTBOX_DELIVERY=exactly-once", "unset it"}},
		{"at-least-once with idempotence and 6 in flight", []string{"OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true", "OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6"},
			[]string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6 (max.in.flight.requests.per.connection)", "set it to 5 or less"}},
		{"at-least-once with default idempotence and 6 in flight", []string{"OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6"},
			[]string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6 (max.in.flight.requests.per.connection)", "set it to 5 or less"}},
		{"at-least-once with acks=1", []string{"OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_ACKS=1"},
			[]string{"OUTBOX_KAFKA_ACKS=1 (acks) contradicts OUTBOX_DELIVERY=at-least-once", "set acks=all"}},
		// The mode allows acks=1 here (explicit override): only the
		// idempotence rule speaks.
		{"explicit idempotence with acks=1", []string{"OUTBOX_DELIVERY=at-most-once", "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true", "OUTBOX_KAFKA_ACKS=1", "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true"},
			[]string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true (enable.idempotence) needs acks=all, but OUTBOX_KAFKA_ACKS is 1", "set acks=all or turn idempotence off"}},
		{"explicit idempotence with acks=0", []string{"OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true"},
			[]string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=true (enable.idempotence) needs acks=all, but OUTBOX_KAFKA_ACKS is 0", "turn idempotence off"}},
		{"at-most-once with acks=all and no override", []string{"OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_ACKS=all"},
			[]string{"OUTBOX_KAFKA_ACKS=all (acks) with OUTBOX_DELIVERY=at-most-once", "unset OUTBOX_KAFKA_ACKS, or set OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true"}},
		{"at-most-once with acks=1 and no override", []string{"OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_ACKS=1"},
			[]string{"OUTBOX_KAFKA_ACKS=1 (acks) with OUTBOX_DELIVERY=at-most-once", "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true"}},
		{"at-most-once with retries", []string{"OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_RETRIES=3"},
			[]string{"OUTBOX_KAFKA_RETRIES=3 (retries) contradicts OUTBOX_DELIVERY=at-most-once", "set it to 0"}},
		{"delivery timeout below linger + request timeout", []string{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS=1000", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=1000", "OUTBOX_KAFKA_LINGER_MS=5"},
			[]string{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS (delivery.timeout.ms) is 1000, less than linger.ms + request.timeout.ms = 1005", "raise it to at least 1005"}},
		{"request timeout above the default delivery timeout", []string{"OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=150000"},
			[]string{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS (delivery.timeout.ms) is 120000, less than linger.ms + request.timeout.ms = 150000", "raise it to at least 150000"}},
		{"compression.type bogus", []string{"OUTBOX_KAFKA_COMPRESSION_TYPE=brotli"},
			[]string{`OUTBOX_KAFKA_COMPRESSION_TYPE (compression.type) is "brotli": expected none, gzip, snappy, lz4 or zstd`}},
		{"acks bogus", []string{"OUTBOX_KAFKA_ACKS=2"},
			[]string{`OUTBOX_KAFKA_ACKS (acks) is "2": expected 0, 1 or all`}},
		{"in flight negative", []string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=-1"},
			[]string{"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION (max.in.flight.requests.per.connection) is -1: expected at least 1"}},
		{"checkpoint larger than batch.size", []string{"OUTBOX_BATCH_SIZE=10000", "OUTBOX_KAFKA_BATCH_SIZE=65536"},
			[]string{"OUTBOX_BATCH_SIZE=10000 needs checkpoint records of up to", "lower OUTBOX_BATCH_SIZE or raise OUTBOX_KAFKA_BATCH_SIZE"}},
		{"idempotence with retries=0", []string{"OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_RETRIES=0"},
			[]string{"OUTBOX_KAFKA_RETRIES=0 (retries) with idempotence on", "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false"}},
		{"retries negative", []string{"OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_RETRIES=-1"},
			[]string{"OUTBOX_KAFKA_RETRIES (retries) is -1: expected 0 or more"}},
		{"delivery mode bogus", []string{"OUTBOX_DELIVERY=exactly-twice"},
			[]string{`OUTBOX_DELIVERY: unknown delivery mode "exactly-twice": expected exactly-once, at-least-once or at-most-once`}},
		{"enable.idempotence malformed", []string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=yes"},
			[]string{"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE is malformed: expected true or false"}},
		{"retries malformed", []string{"OUTBOX_KAFKA_RETRIES=many"},
			[]string{"OUTBOX_KAFKA_RETRIES is malformed: expected an integer"}},
		{"delivery.timeout.ms malformed", []string{"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS=2m"},
			[]string{`OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS is "2m": expected milliseconds, a non-negative integer`}},
		{"request.timeout.ms malformed", []string{"OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=30s"},
			[]string{`OUTBOX_KAFKA_REQUEST_TIMEOUT_MS is "30s": expected milliseconds`}},
		{"transaction.timeout.ms negative", []string{"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=-60000"},
			[]string{`OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS is "-60000": expected milliseconds, a non-negative integer`}},
		{"linger.ms malformed", []string{"OUTBOX_KAFKA_LINGER_MS=5.5"},
			[]string{`OUTBOX_KAFKA_LINGER_MS is "5.5": expected milliseconds`}},
		{"two *.ms malformed, both named", []string{"OUTBOX_KAFKA_LINGER_MS=x", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=y"},
			[]string{"OUTBOX_KAFKA_LINGER_MS", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS"}},
	}
	// What a refusal must not say.
	mustNot := map[string][]string{
		// Idempotence is off only by acks' default: no second line
		// about a variable the operator never set.
		"exactly-once with acks=1": {"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE"},
		"exactly-once with acks=0": {"OUTBOX_KAFKA_ENABLE_IDEMPOTENCE"},
		// Go types are not what an operator expects.
		"enable.idempotence malformed": {"*bool"},
		"retries malformed":            {"*int"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := LoadConfig(append(base(), c.env...))
			if err == nil {
				t.Fatalf("%v: accepted, want refused", c.env)
			}
			msg := err.Error()
			for _, w := range c.want {
				if !strings.Contains(msg, w) {
					t.Errorf("%v: error %q does not contain %q", c.env, msg, w)
				}
			}
			for _, n := range mustNot[c.name] {
				if strings.Contains(msg, n) {
					t.Errorf("%v: error %q contains %q", c.env, msg, n)
				}
			}
			if strings.Contains(msg, "\n") {
				t.Errorf("error is not one line: %q", msg)
			}
			if strings.Contains(msg, "s3cret-pw") {
				t.Errorf("error shows the password: %q", msg)
			}
		})
	}
}

// TestSettingsAllowed: combinations Kafka allows are not refused, explicit
// values are applied in Kafka's units, and the at-most-once override comes
// with a warning.
func TestSettingsAllowed(t *testing.T) {
	t.Run("at-most-once with acks=all and the override warns", func(t *testing.T) {
		s, warnings, err := settingsFor(t, "OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_ACKS=all", "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true")
		if err != nil {
			t.Fatal(err)
		}
		if s.Mode != txn.AtMostOnce || s.Acks != txn.AcksAll || s.Idempotence || s.Retries != 0 {
			t.Fatalf("settings %+v: want at-most-once, acks=all, idempotence off, retries 0", s)
		}
		if len(warnings) != 1 || !strings.Contains(warnings[0], "acks=all") || !strings.Contains(warnings[0], "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true") ||
			!strings.Contains(warnings[0], "loss") {
			t.Fatalf("warnings %q: want one naming acks=all, the override, and that a failed send is still a loss", warnings)
		}
	})
	t.Run("at-most-once with acks=1 and the override: idempotence off by Kafka's rule", func(t *testing.T) {
		s, warnings, err := settingsFor(t, "OUTBOX_DELIVERY=at-most-once", "OUTBOX_KAFKA_ACKS=1", "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS=true")
		if err != nil {
			t.Fatal(err)
		}
		if s.Acks != 1 || s.Idempotence || len(warnings) != 1 {
			t.Fatalf("settings %+v, warnings %q", s, warnings)
		}
	})
	t.Run("at-least-once without idempotence may have 6 in flight", func(t *testing.T) {
		s, _, err := settingsFor(t, "OUTBOX_DELIVERY=at-least-once", "OUTBOX_KAFKA_ENABLE_IDEMPOTENCE=false", "OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=6")
		if err != nil {
			t.Fatal(err)
		}
		if s.Idempotence || s.MaxInFlight != 6 || s.Acks != txn.AcksAll {
			t.Fatalf("settings %+v", s)
		}
	})
	t.Run("delivery timeout exactly linger + request timeout", func(t *testing.T) {
		s, _, err := settingsFor(t, "OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS=1005", "OUTBOX_KAFKA_REQUEST_TIMEOUT_MS=1000", "OUTBOX_KAFKA_LINGER_MS=5",
			"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=15000")
		if err != nil {
			t.Fatal(err)
		}
		if s.DeliveryTimeout != 1005*time.Millisecond || s.RequestTimeout != time.Second || s.Linger != 5*time.Millisecond ||
			s.TransactionTimeout != 15*time.Second {
			t.Fatalf("*.ms not applied in milliseconds: %+v", s)
		}
	})
	t.Run("every other setting is applied", func(t *testing.T) {
		s, _, err := settingsFor(t, "OUTBOX_KAFKA_COMPRESSION_TYPE=ZSTD", "OUTBOX_KAFKA_BATCH_SIZE=65536", "OUTBOX_KAFKA_CLIENT_ID=payments",
			"OUTBOX_KAFKA_MAX_IN_FLIGHT_REQUESTS_PER_CONNECTION=1", "OUTBOX_KAFKA_RETRIES=10", "OUTBOX_KAFKA_ACKS=-1")
		if err != nil {
			t.Fatal(err)
		}
		if s.Compression != "zstd" || s.BatchMaxBytes != 65536 || s.ClientID != "payments" || s.MaxInFlight != 1 ||
			s.Retries != 10 || s.Acks != txn.AcksAll || !s.Idempotence {
			t.Fatalf("settings %+v", s)
		}
	})
}

// TestRetryBackoffJitter: a shard's retry backoff is spread by up to ±20%,
// so that relays failing together do not retry in lockstep.
func TestRetryBackoffJitter(t *testing.T) {
	const d = time.Second
	lo, hi := d, d
	for range 2000 {
		j := jittered(d)
		if j < d*8/10 || j > d*12/10 {
			t.Fatalf("jittered(%v) = %v, outside ±20%%", d, j)
		}
		lo, hi = min(lo, j), max(hi, j)
	}
	if lo > d*9/10 || hi < d*11/10 {
		t.Fatalf("jittered(%v) stayed within [%v, %v]: no real spread", d, lo, hi)
	}
}
