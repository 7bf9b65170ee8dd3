package check

import (
	"encoding/json"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"sort"
	"strings"
	"testing"

	monitoringv1 "github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

func chartDir(t *testing.T) string {
	t.Helper()
	return filepath.Join(repoRoot(t), "deploy", "helm", "outbox-relay")
}

// scenarios are the values the chart is checked with: the defaults and the
// realistic ones of the chart's ci/ directory.
func scenarios(t *testing.T) map[string]map[string]any {
	t.Helper()
	out := map[string]map[string]any{"default values": nil}
	files, err := filepath.Glob(filepath.Join(chartDir(t), "ci", "*-values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if len(files) < 3 {
		t.Fatalf("ci/*-values.yaml: %d files, want the 3-shard, SASL and at-least-once examples", len(files))
	}
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var v map[string]any
		if err := yaml.Unmarshal(b, &v); err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		out["ci/"+filepath.Base(f)] = v
	}
	return out
}

// TestHelmChart: for the default values and every ci/ example the chart
// lints clean (helm lint --strict), renders, every object decodes strictly,
// the objects agree with the relay (variables, probes and ports, security
// context), the hooks are runnable at pre-install, and every config value
// reaches the relay's environment as given.
func TestHelmChart(t *testing.T) {
	root := repoRoot(t)
	vars, err := RelayVariables(root)
	if err != nil {
		t.Fatal(err)
	}
	_, series := relayMetrics(t)
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, vals := range scenarios(t) {
		t.Run(name, func(t *testing.T) {
			for _, err := range LintChart(chartDir(t), vals, "payments") {
				t.Error(err)
			}
			r, err := RenderChart(ch, "payments", "payments", vals)
			if err != nil {
				t.Fatal(err)
			}
			objs, err := r.Objects()
			if err != nil {
				t.Fatal(err)
			}
			for _, err := range CheckObjects(objs, vars) {
				t.Error(err)
			}
			for _, err := range CheckHooks(r) {
				t.Error(err)
			}
			checkConfigReachesTheRelay(t, ch.Values, vals, objs)
			checkMonitoring(t, objs, series, root)
			var kinds []string
			for _, o := range objs {
				kinds = append(kinds, o.Kind+"/"+o.Name)
			}
			sort.Strings(kinds)
			t.Logf("%d objects: %s", len(objs), strings.Join(kinds, " "))
		})
	}
}

// relayContainer returns the relay Deployment's relay container.
func relayContainer(t *testing.T, objs []Object) (*appsv1.Deployment, corev1.Container) {
	t.Helper()
	for _, o := range objs {
		if d, ok := o.Obj.(*appsv1.Deployment); ok {
			for _, c := range d.Spec.Template.Spec.Containers {
				if isRelay(c) {
					return d, c
				}
			}
		}
	}
	t.Fatal("no relay Deployment rendered")
	return nil, corev1.Container{}
}

// checkConfigReachesTheRelay: every non-empty value of config (the chart's
// merged with the scenario's) is the relay container's variable of that
// name, with the same text.
func checkConfigReachesTheRelay(t *testing.T, chartValues, vals map[string]any, objs []Object) {
	t.Helper()
	config := map[string]any{}
	if c, ok := chartValues["config"].(map[string]any); ok {
		maps.Copy(config, c)
	}
	if c, ok := vals["config"].(map[string]any); ok {
		maps.Copy(config, c)
	}
	_, c := relayContainer(t, objs)
	env := map[string]string{}
	for _, e := range c.Env {
		env[e.Name] = e.Value
	}
	for k, v := range config {
		want := fmt.Sprint(v)
		if f, ok := v.(float64); ok && f == float64(int64(f)) {
			want = fmt.Sprint(int64(f))
		}
		if want == "" {
			continue
		}
		if got, ok := env[k]; !ok || got != want {
			t.Errorf("config.%s is %q, the relay container has %q (set: %v)", k, want, got, ok)
		}
	}
}

// checkMonitoring: a rendered PrometheusRule holds exactly the groups of
// deploy/prometheus/alerts.yaml with the job the ServiceMonitor gives, and
// its expressions use only registered metrics.
func checkMonitoring(t *testing.T, objs []Object, series map[string]Metric, root string) {
	t.Helper()
	var rule *monitoringv1.PrometheusRule
	var sm *monitoringv1.ServiceMonitor
	var svc *corev1.Service
	for _, o := range objs {
		switch v := o.Obj.(type) {
		case *monitoringv1.PrometheusRule:
			rule = v
		case *monitoringv1.ServiceMonitor:
			sm = v
		case *corev1.Service:
			svc = v
		}
	}
	if rule == nil {
		return
	}
	if sm == nil || svc == nil {
		t.Fatal("a PrometheusRule without the ServiceMonitor and Service that give its job")
	}
	job := svc.Labels[sm.Spec.JobLabel]
	if sm.Spec.JobLabel == "" || job == "" {
		t.Fatalf("ServiceMonitor jobLabel %q: Service %s has no such label", sm.Spec.JobLabel, svc.Name)
	}
	b, err := os.ReadFile(filepath.Join(root, "deploy", "prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	want := strings.ReplaceAll(string(b), `job="outbox-relay"`, fmt.Sprintf("job=%q", job))
	groups, _, err := ParseRules("deploy/prometheus/alerts.yaml", []byte(want))
	if err != nil {
		t.Fatal(err)
	}
	// The operator's groups, as a Prometheus rule file.
	got, err := yaml.Marshal(map[string]any{"groups": rule.Spec.Groups})
	if err != nil {
		t.Fatal(err)
	}
	gotGroups, queries, err := ParseRules("PrometheusRule "+rule.Name, got)
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range CheckQueries(queries, series) {
		t.Error(err)
	}
	wantJSON, _ := json.Marshal(groups)
	gotJSON, _ := json.Marshal(gotGroups)
	if !reflect.DeepEqual(wantJSON, gotJSON) {
		t.Errorf("PrometheusRule %s differs from deploy/prometheus/alerts.yaml (job %q):\n got %s\nwant %s", rule.Name, job, gotJSON, wantJSON)
	}
	for _, q := range queries {
		if strings.Contains(q.Expr, "job=") && !strings.Contains(q.Expr, fmt.Sprintf("job=%q", job)) {
			t.Errorf("%s: selects another job than %q, the ServiceMonitor's: %s", q.Where, job, q.Expr)
		}
	}
}

// TestHelmValuesCoverEveryRelayVariable: the chart's config (values.yaml and
// values.schema.json, key for key) offers every variable the relay reads,
// except those the chart sets itself (the Secret's, OUTBOX_METRICS_ADDR), and
// only those; a value given in values.yaml is the relay's own default.
func TestHelmValuesCoverEveryRelayVariable(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	config, _ := ch.Values["config"].(map[string]any)
	var schema struct {
		Properties struct {
			Config struct {
				Properties map[string]any `json:"properties"`
			} `json:"config"`
		} `json:"properties"`
	}
	if err := json.Unmarshal(ch.Schema, &schema); err != nil {
		t.Fatalf("values.schema.json: %v", err)
	}
	props := schema.Properties.Config.Properties
	if !slices.Equal(slices.Sorted(maps.Keys(config)), slices.Sorted(maps.Keys(props))) {
		t.Errorf("values.yaml config keys %v differ from values.schema.json's %v", slices.Sorted(maps.Keys(config)), slices.Sorted(maps.Keys(props)))
	}
	// What the chart sets by itself, whatever config says: the relay
	// container's variables that config does not name, in a render with
	// PLAIN (the SASL user and password from the Secret) and one with
	// OAUTHBEARER's token endpoint (its client secret from the Secret).
	managed := map[string]bool{}
	for _, cfg := range []map[string]any{
		{"OUTBOX_KAFKA_SASL_MECHANISM": "PLAIN", "OUTBOX_KAFKA_CLIENT_ID": ""},
		{"OUTBOX_KAFKA_SASL_MECHANISM": "OAUTHBEARER", "OUTBOX_KAFKA_SASL_OAUTHBEARER_TOKEN_ENDPOINT_URL": "https://login.example.com/token"},
	} {
		r, err := RenderChart(ch, "payments", "payments", map[string]any{"config": cfg})
		if err != nil {
			t.Fatal(err)
		}
		objs, err := r.Objects()
		if err != nil {
			t.Fatal(err)
		}
		_, c := relayContainer(t, objs)
		for _, e := range c.Env {
			if _, inConfig := props[e.Name]; !inConfig {
				managed[e.Name] = true
			}
		}
	}
	for _, name := range vars.Names() {
		if _, ok := props[name]; !ok && !managed[name] {
			t.Errorf("the relay reads %s (%s), but the chart neither sets it nor offers it: add it to config in values.yaml (documented) and values.schema.json", name, vars.Where[name])
		}
	}
	for name := range props {
		if !vars.Has(name) {
			t.Errorf("values.schema.json offers config.%s, which the relay does not read%s", name, vars.suggest(name))
		}
		if managed[name] {
			t.Errorf("config.%s is also set by the chart itself", name)
		}
	}
	for name, v := range config {
		s := fmt.Sprint(v)
		if f, ok := v.(float64); ok && f == float64(int64(f)) {
			s = fmt.Sprint(int64(f))
		}
		if d, ok := vars.Defaults[name]; ok && s != "" && s != d {
			t.Errorf("values.yaml config.%s is %q, but the relay's default is %q: the values show the relay's defaults", name, s, d)
		}
	}
}

// TestHelmValuesTypoFailsAtInstall: a misspelled value, an unknown relay
// variable or a wrong type is refused by values.schema.json when Helm
// renders, before anything is applied.
func TestHelmValuesTypoFailsAtInstall(t *testing.T) {
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		vals map[string]any
		want string
	}{
		{map[string]any{"replicaCont": 3}, "replicaCont"},
		{map[string]any{"config": map[string]any{"OUTBOX_SHARD": 3}}, "OUTBOX_SHARD"},
		{map[string]any{"config": map[string]any{"OUTBOX_DELIVERY": "exactly_once"}}, "OUTBOX_DELIVERY"},
		{map[string]any{"config": map[string]any{"OUTBOX_POLL_INTERVAL": "1 second"}}, "OUTBOX_POLL_INTERVAL"},
		{map[string]any{"securityContext": map[string]any{"readOnlyRootFilesystem": false, "allowPrivilegeEscalation": false}}, "readOnlyRootFilesystem"},
		{map[string]any{"serviceMonitor": map[string]any{"enable": true}}, "enable"},
	} {
		_, err := RenderChart(ch, "payments", "payments", tc.vals)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("values %v: got %v, want an error naming %s", tc.vals, err, tc.want)
		}
	}
}
