package check

import (
	chart "helm.sh/helm/v4/pkg/chart/v2"
	chartutil "helm.sh/helm/v4/pkg/chart/v2/util"
	"strings"
	"testing"
)

// TestHelmChartAsASubchart: the chart renders as a dependency of an
// umbrella chart that sets global values (Helm always passes `global` to a
// subchart), with the umbrella's values for it, and honours
// global.imageRegistry.
func TestHelmChartAsASubchart(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	sub, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	umbrella := &chart.Chart{
		Metadata: &chart.Metadata{APIVersion: chart.APIVersionV2, Name: "platform", Version: "1.0.0", Type: "application",
			Dependencies: []*chart.Dependency{{Name: sub.Name(), Version: sub.Metadata.Version, Repository: "file://../outbox-relay"}}},
		Values: map[string]any{
			"global": map[string]any{"imageRegistry": "registry.example.com", "environment": "production"},
			sub.Name(): map[string]any{
				"config":    map[string]any{"OUTBOX_KAFKA_BROKERS": "kafka-0.kafka:9092"},
				"migration": map[string]any{"secretName": "platform-outbox-admin"},
			},
		},
	}
	umbrella.AddDependency(sub)
	vals := map[string]any{"global": map[string]any{"owner": "payments-team"}}
	if err := chartutil.ProcessDependencies(umbrella, vals); err != nil {
		t.Fatal(err)
	}
	objs, _, err := renderObjects(t, umbrella, "platform", vals)
	if err != nil {
		t.Fatalf("the chart as a subchart with global values: %v", err)
	}
	for _, err := range CheckObjects(objs, vars) {
		t.Error(err)
	}
	for _, err := range CheckMigrationRole(objs) {
		t.Error(err)
	}
	_, c := relayContainer(t, objs)
	if !strings.HasPrefix(c.Image, "registry.example.com/") {
		t.Errorf("global.imageRegistry registry.example.com: the relay's image is %q", c.Image)
	}
	t.Logf("%d objects, relay image %s", len(objs), c.Image)
}
