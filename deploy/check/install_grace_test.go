package check

import (
	corev1 "k8s.io/api/core/v1"
	"strings"
	"testing"
	"time"
)

// TestHelmGracePeriodAboveShutdownTimeout: whatever the values say, the
// relay pods' terminationGracePeriodSeconds exceeds OUTBOX_SHUTDOWN_TIMEOUT,
// or the render fails naming both.
func TestHelmGracePeriodAboveShutdownTimeout(t *testing.T) {
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		vals       map[string]any
		mustRender bool
	}{
		{nil, true},
		{map[string]any{"config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "2m"}}, true},
		{map[string]any{"config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "1m30s"}}, true},
		{map[string]any{"config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "1500ms"}}, true},
		{map[string]any{"config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "1h"}}, true},
		{map[string]any{"terminationGracePeriodSeconds": 20}, false},
		{map[string]any{"terminationGracePeriodSeconds": 90, "config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "1m30s"}}, false},
		{map[string]any{"terminationGracePeriodSeconds": 200, "config": map[string]any{"OUTBOX_SHUTDOWN_TIMEOUT": "2m"}}, true},
	} {
		shutdown := "30s"
		if c, ok := tc.vals["config"].(map[string]any); ok {
			shutdown = c["OUTBOX_SHUTDOWN_TIMEOUT"].(string)
		}
		d, _ := time.ParseDuration(shutdown)
		objs, _, err := renderObjects(t, ch, "payments", tc.vals)
		if err != nil {
			if tc.mustRender || !strings.Contains(err.Error(), "terminationGracePeriodSeconds") || !strings.Contains(err.Error(), "OUTBOX_SHUTDOWN_TIMEOUT") {
				t.Errorf("values %v: %v", tc.vals, err)
			} else {
				t.Logf("values %v: refused: %v", tc.vals, err)
			}
			continue
		}
		dep, _ := relayContainer(t, objs)
		grace := int64(corev1.DefaultTerminationGracePeriodSeconds)
		if g := dep.Spec.Template.Spec.TerminationGracePeriodSeconds; g != nil {
			grace = *g
		}
		if time.Duration(grace)*time.Second <= d {
			t.Errorf("values %v: terminationGracePeriodSeconds %d does not exceed OUTBOX_SHUTDOWN_TIMEOUT=%s, and the render did not fail", tc.vals, grace, shutdown)
		} else {
			t.Logf("values %v: terminationGracePeriodSeconds %d", tc.vals, grace)
		}
	}
}
