package check

import (
	"strings"
	"testing"
)

func repoRoot(t *testing.T) string {
	t.Helper()
	root, err := RepoRoot(".")
	if err != nil {
		t.Fatal(err)
	}
	return root
}

// TestRelayVariablesAreDerivedFromTheSource: the derivation finds the
// variables of relay.Config's tags, LoadConfig's hand-read *_MS ones and
// the admin commands' ones, and nothing from tests.
func TestRelayVariablesAreDerivedFromTheSource(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{"OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BROKERS", "OUTBOX_SHARDS", "OUTBOX_METRICS_ADDR",
		"OUTBOX_KAFKA_DELIVERY_TIMEOUT_MS", "OUTBOX_KAFKA_LINGER_MS", "OUTBOX_KAFKA_SASL_PASSWORD", "OUTBOX_AT_MOST_ONCE_ALLOW_ACKS"} {
		if !vars.Has(name) {
			t.Errorf("%s not derived; derived: %s", name, strings.Join(vars.Names(), " "))
		}
	}
	// Read only by tests (integration/kill_test.go), never by the binary.
	if vars.Has("OUTBOX_KILL_ROUNDS") {
		t.Errorf("OUTBOX_KILL_ROUNDS derived from %s: test files must not count", vars.Where["OUTBOX_KILL_ROUNDS"])
	}
	if d := vars.Defaults["OUTBOX_SHARDS"]; d != "1" {
		t.Errorf("default of OUTBOX_SHARDS is %q, want 1", d)
	}
	t.Logf("%d variables: %s", len(vars.Where), strings.Join(vars.Names(), " "))
}

// TestRelayMetricsAreDerivedFromTheSource: every metric of relay/metrics.go
// is found with its full name and kind.
func TestRelayMetricsAreDerivedFromTheSource(t *testing.T) {
	metrics, err := RelayMetrics(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	series := SeriesNames(metrics)
	for name, kind := range map[string]string{
		"outbox_relay_backlog_rows":                      "gauge",
		"outbox_relay_published_records_total":           "counter",
		"outbox_relay_end_to_end_latency_seconds_bucket": "histogram",
	} {
		if m, ok := series[name]; !ok || m.Kind != kind {
			t.Errorf("%s: got %+v, want a %s", name, m, kind)
		}
	}
	if _, ok := series["outbox_relay_end_to_end_latency_seconds"]; ok {
		t.Errorf("a histogram's bare name is not a series")
	}
	for _, m := range metrics {
		t.Logf("%s %s (%s)", m.Name, m.Kind, m.Where)
	}
}
