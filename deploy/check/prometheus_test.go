package check

import (
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"
)

func relayMetrics(t *testing.T) ([]Metric, map[string]Metric) {
	t.Helper()
	metrics, err := RelayMetrics(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	return metrics, SeriesNames(metrics)
}

// TestAlertRulesUseOnlyRegisteredMetrics: deploy/prometheus/alerts.yaml
// parses with Prometheus' rule parser (strict), and every metric its
// expressions and its promtool tests use is one the relay registers.
func TestAlertRulesUseOnlyRegisteredMetrics(t *testing.T) {
	_, series := relayMetrics(t)
	dir := filepath.Join(repoRoot(t), "deploy", "prometheus")
	b, err := os.ReadFile(filepath.Join(dir, "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, queries, err := ParseRules("deploy/prometheus/alerts.yaml", b)
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range CheckQueries(queries, series) {
		t.Error(err)
	}
	tb, err := os.ReadFile(filepath.Join(dir, "alerts_test.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	inputs, err := RuleTestSeries("deploy/prometheus/alerts_test.yaml", tb)
	if err != nil {
		t.Fatal(err)
	}
	for name, where := range inputs {
		if _, ok := series[name]; !ok && !scrapeMetrics[name] {
			t.Errorf("%s: input series %s is not a metric the relay registers%s", where, name, suggestMetric(name, series))
		}
	}
	t.Logf("%d rules, %d test input metrics", len(queries), len(inputs))
}

// TestDashboardUsesOnlyRegisteredMetrics: every PromQL expression of the
// Grafana dashboard (panels and variables) parses with Prometheus' parser
// and uses only metrics the relay registers.
func TestDashboardUsesOnlyRegisteredMetrics(t *testing.T) {
	_, series := relayMetrics(t)
	queries, err := DashboardQueries(filepath.Join(repoRoot(t), "deploy", "grafana", "outbox-relay.json"))
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range CheckQueries(queries, series) {
		t.Error(err)
	}
	t.Logf("%d dashboard queries", len(queries))
}

// TestMetricNamesInProseAreRegistered: the names of relay metrics in the
// deploy kit's descriptions, annotations and comments are registered ones.
func TestMetricNamesInProseAreRegistered(t *testing.T) {
	metrics, _ := relayMetrics(t)
	root := repoRoot(t)
	files := 0
	err := filepath.WalkDir(filepath.Join(root, "deploy"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path == filepath.Join(root, "deploy", "check") {
			return filepath.SkipDir // the checks' own tests name wrong metrics on purpose
		}
		if d.IsDir() || d.Type()&fs.ModeSymlink != 0 {
			return nil
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		files++
		rel, _ := filepath.Rel(root, path)
		for _, err := range CheckMentions(rel, b, metrics) {
			t.Error(err)
		}
		return nil
	})
	if err != nil || files < 10 {
		t.Fatalf("read %d files under deploy/: %v", files, err)
	}
}

// TestEveryRegisteredMetricIsDocumented: the documentation (README.md and
// docs/*.md: the relay's metrics in docs/operations.md, the inbox's in
// docs/inbox.md, the replication source's in docs/replication.md) names
// every metric the relay registers.
func TestEveryRegisteredMetricIsDocumented(t *testing.T) {
	metrics, _ := relayMetrics(t)
	root := repoRoot(t)
	files, err := filepath.Glob(filepath.Join(root, "docs", "*.md"))
	if err != nil {
		t.Fatal(err)
	}
	var docs []byte
	for _, f := range append([]string{filepath.Join(root, "README.md")}, files...) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		docs = append(append(docs, b...), '\n')
	}
	for _, m := range Undocumented(docs, metrics) {
		t.Errorf("metric %s (%s) is not documented in README.md or docs/*.md: add `%s` to the metrics of docs/operations.md", m.Name, m.Where, strings.TrimPrefix(m.Name, "outbox_relay_"))
	}
}

// TestPrometheusScrapesTheRelaysMetricsPort: the compose Prometheus scrapes
// the port the compose relays serve /metrics on.
func TestPrometheusScrapesTheRelaysMetricsPort(t *testing.T) {
	root := repoRoot(t)
	vars, err := RelayVariables(root)
	if err != nil {
		t.Fatal(err)
	}
	p, err := LoadCompose(t.Context(), filepath.Join(root, "deploy", "compose.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ports, _ := CheckCompose(p, vars)
	b, err := os.ReadFile(filepath.Join(root, "deploy", "prometheus", "prometheus.yml"))
	if err != nil {
		t.Fatal(err)
	}
	var cfg struct {
		ScrapeConfigs []struct {
			JobName      string `json:"job_name"`
			DNSSDConfigs []struct {
				Names []string `json:"names"`
				Port  int32    `json:"port"`
			} `json:"dns_sd_configs"`
		} `json:"scrape_configs"`
	}
	if err := yaml.Unmarshal(b, &cfg); err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, sc := range cfg.ScrapeConfigs {
		for _, sd := range sc.DNSSDConfigs {
			for _, n := range sd.Names {
				port, ok := ports[n]
				if !ok {
					t.Errorf("prometheus.yml job %s scrapes %s, which is no relay service of compose.yaml (relays: %v)", sc.JobName, n, ports)
					continue
				}
				if port != sd.Port {
					t.Errorf("prometheus.yml job %s scrapes %s on port %d, but it serves /metrics on %d", sc.JobName, n, sd.Port, port)
				}
				checked++
			}
		}
	}
	if checked == 0 {
		t.Errorf("prometheus.yml scrapes no relay")
	}
}
