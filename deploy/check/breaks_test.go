package check

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The checks must fail on the mistakes they exist for. Each test below
// breaks a copy of a real deploy file in one way and expects the check to
// name the mistake.

// broken copies the files of src (a directory, flat) into a temporary
// directory, replacing old by new in file name, which must contain old.
func broken(t *testing.T, src, name, old, new string) string {
	t.Helper()
	dst := t.TempDir()
	entries, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	replaced := false
	for _, e := range entries {
		if e.IsDir() {
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, e.Name()))
		if err != nil {
			t.Fatal(err)
		}
		if e.Name() == name {
			if !strings.Contains(string(b), old) {
				t.Fatalf("%s has no %q to break", name, old)
			}
			b = []byte(strings.Replace(string(b), old, new, 1))
			replaced = true
		}
		if err := os.WriteFile(filepath.Join(dst, e.Name()), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if !replaced {
		t.Fatalf("no file %s in %s", name, src)
	}
	return dst
}

func wantError(t *testing.T, errs []error, want string) {
	t.Helper()
	for _, err := range errs {
		if strings.Contains(err.Error(), want) {
			t.Logf("caught: %v", err)
			return
		}
	}
	t.Errorf("no error names %q; got %v", want, errs)
}

func kustomizeObjects(t *testing.T, dir string) ([]Object, error) {
	t.Helper()
	out, err := KustomizeBuild(dir)
	if err != nil {
		return nil, err
	}
	return DecodeStrict("kustomize build", out)
}

func TestChecksCatchAMisspelledKubernetesField(t *testing.T) {
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "kubernetes"), "deployment.yaml", "readinessProbe:", "readinesProbe:")
	_, err := kustomizeObjects(t, dir)
	wantError(t, []error{err}, `unknown field "spec.template.spec.containers[0].readinesProbe"`)
}

func TestChecksCatchAnUnknownVariableInAConfigMap(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "kubernetes"), "configmap.yaml", "OUTBOX_BATCH_SIZE:", "OUTBOX_BATCHSIZE:")
	objs, err := kustomizeObjects(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckObjects(objs, vars), "OUTBOX_BATCHSIZE is not a variable the relay reads (did you mean OUTBOX_BATCH_SIZE?")
}

func TestChecksCatchProbesOffTheMetricsPort(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "kubernetes"), "configmap.yaml", `OUTBOX_METRICS_ADDR: ":9090"`, `OUTBOX_METRICS_ADDR: ":8080"`)
	objs, err := kustomizeObjects(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckObjects(objs, vars), "declares no TCP containerPort 8080")
	wantError(t, CheckObjects(objs, vars), "the readiness probe's port metrics is not 8080")
}

func TestChecksCatchAMisspelledComposeKey(t *testing.T) {
	dir := broken(t, filepath.Join(repoRoot(t), "deploy"), "compose.yaml", "stop_grace_period: 45s", "stop_grace_priod: 45s")
	_, err := LoadCompose(context.Background(), filepath.Join(dir, "compose.yaml"))
	wantError(t, []error{err}, "stop_grace_priod")
}

func TestChecksCatchAnUnknownVariableInCompose(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	dir := broken(t, filepath.Join(repoRoot(t), "deploy"), "compose.yaml", "OUTBOX_LOG_LEVEL: info", "OUTBOX_LOGLEVEL: info")
	p, err := LoadCompose(context.Background(), filepath.Join(dir, "compose.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, errs := CheckCompose(p, vars)
	wantError(t, errs, "sets OUTBOX_LOGLEVEL, which the relay does not read (did you mean OUTBOX_LOG_LEVEL?")
}

func TestChecksCatchAnUnregisteredMetricInTheAlerts(t *testing.T) {
	_, series := relayMetrics(t)
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "prometheus"), "alerts.yaml", "outbox_relay_fenced_total", "outbox_relay_fencings_total")
	b, err := os.ReadFile(filepath.Join(dir, "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, queries, err := ParseRules("alerts.yaml", b)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckQueries(queries, series), "metric outbox_relay_fencings_total is not registered by the relay (relay/metrics.go); did you mean outbox_relay_fenced_total?")
}

func TestChecksCatchAnUnregisteredMetricInTheDashboard(t *testing.T) {
	_, series := relayMetrics(t)
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "grafana"), "outbox-relay.json", "(outbox_relay_backlog_rows{", "(outbox_relay_backlog{")
	queries, err := DashboardQueries(filepath.Join(dir, "outbox-relay.json"))
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckQueries(queries, series), "metric outbox_relay_backlog is not registered")
}

func TestChecksCatchAnInvalidAlertField(t *testing.T) {
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "prometheus"), "alerts.yaml", "    for: 2m", "    fro: 2m")
	b, err := os.ReadFile(filepath.Join(dir, "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = ParseRules("alerts.yaml", b)
	wantError(t, []error{err}, "field fro not found")
}

func TestChecksCatchAnUnknownVariableInChartValues(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	// extraEnv is free-form for the schema: the rendered check catches it.
	r, err := RenderChart(ch, "payments", "payments", map[string]any{
		"extraEnv": []any{map[string]any{"name": "OUTBOX_TRANSACTION_TIMEOUT", "value": "60s"}}})
	if err != nil {
		t.Fatal(err)
	}
	objs, err := r.Objects()
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckObjects(objs, vars), "sets OUTBOX_TRANSACTION_TIMEOUT, which the relay does not read (did you mean OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS?")
	// A misspelled field inside free-form values fails strict decoding.
	r, err = RenderChart(ch, "payments", "payments", map[string]any{
		"extraVolumes": []any{map[string]any{"name": "ca", "secret": map[string]any{"secretNme": "kafka-ca"}}}})
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.Objects()
	wantError(t, []error{err, errors.New("")}, `unknown field "spec.template.spec.volumes[0].secret.secretNme"`)
}

func TestChecksCatchAnUnregisteredMetricInADescription(t *testing.T) {
	metrics, _ := relayMetrics(t)
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "grafana"), "outbox-relay.json", "(outbox_relay_backlog_rows,", "(outbox_relay_backlog_row,")
	b, err := os.ReadFile(filepath.Join(dir, "outbox-relay.json"))
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckMentions("outbox-relay.json", b, metrics), "names outbox_relay_backlog_row, which the relay does not register; did you mean outbox_relay_backlog_rows?")
}

func TestChecksCatchAMigrationWithTheRelaysURL(t *testing.T) {
	dir := broken(t, filepath.Join(repoRoot(t), "deploy", "kubernetes"), "migrate-job.yaml", "name: outbox-relay-admin-db", "name: outbox-relay-db")
	objs, err := kustomizeObjects(t, dir)
	if err != nil {
		t.Fatal(err)
	}
	wantError(t, CheckMigrationRole(objs), "runs migrate up with the relay's database URL (Secret outbox-relay-db key OUTBOX_DATABASE_URL")
}
