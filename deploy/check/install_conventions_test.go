package check

import (
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"os"
	"path/filepath"
	"regexp"
	"sigs.k8s.io/yaml"
	"slices"
	"strings"
	"testing"
)

// TestHelmChartConventions: the conventions of well-kept charts: an image
// by digest as well as tag, a pinned default tag (the appVersion, also
// kustomize's), a startupProbe, an optional NetworkPolicy for the metrics
// port, commonLabels and podAnnotations, environment from Secrets
// (extraEnv, extraEnvFrom), and a `helm test` hook running `outbox-relay
// status`.
func TestHelmChartConventions(t *testing.T) {
	vars, err := RelayVariables(repoRoot(t))
	if err != nil {
		t.Fatal(err)
	}
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	render := func(t *testing.T, vals map[string]any) ([]Object, *Rendered) {
		t.Helper()
		objs, r, err := renderObjects(t, ch, "payments", vals)
		if err != nil {
			t.Fatal(err)
		}
		for _, err := range CheckObjects(objs, vars) {
			t.Error(err)
		}
		return objs, r
	}
	t.Run("pinned default tag", func(t *testing.T) {
		app := ch.Metadata.AppVersion
		if !regexp.MustCompile(`^v[0-9]+\.[0-9]+\.[0-9]+$`).MatchString(app) {
			t.Errorf("Chart.yaml appVersion %q: want a release version (v1.2.3), the default image tag", app)
		}
		objs, _ := render(t, nil)
		if _, c := relayContainer(t, objs); c.Image != "outbox-relay:"+app {
			t.Errorf("default image %q, want outbox-relay:%s", c.Image, app)
		}
		b, err := os.ReadFile(filepath.Join(repoRoot(t), "deploy", "kubernetes", "kustomization.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var k struct {
			Images []struct {
				Name   string `json:"name"`
				NewTag string `json:"newTag"`
			} `json:"images"`
		}
		if err := yaml.Unmarshal(b, &k); err != nil {
			t.Fatal(err)
		}
		for _, img := range k.Images {
			if img.NewTag != app {
				t.Errorf("deploy/kubernetes/kustomization.yaml: image %s newTag %q, want the chart's appVersion %s", img.Name, img.NewTag, app)
			}
		}
	})
	t.Run("image digest", func(t *testing.T) {
		digest := "sha256:" + strings.Repeat("ab", 32)
		for _, tc := range []struct {
			image map[string]any
			want  string
		}{
			{map[string]any{"repository": "registry.example.com/outbox-relay", "tag": "v1.2.3", "digest": digest}, "registry.example.com/outbox-relay:v1.2.3@" + digest},
			{map[string]any{"repository": "registry.example.com/outbox-relay", "digest": digest}, "registry.example.com/outbox-relay:" + ch.Metadata.AppVersion + "@" + digest},
		} {
			objs, _ := render(t, map[string]any{"image": tc.image})
			for _, o := range objs {
				_, pod := podOf(o)
				if pod == nil {
					continue
				}
				for _, c := range pod.Containers {
					if c.Image != tc.want {
						t.Errorf("image %v: %s container %s runs %q, want %q", tc.image, o, c.Name, c.Image, tc.want)
					}
				}
			}
		}
		if _, err := RenderChart(ch, "payments", "payments", map[string]any{"image": map[string]any{"repository": "r", "digest": "abc"}}); err == nil || !strings.Contains(err.Error(), "digest") {
			t.Errorf("image.digest abc: got %v, want the schema to refuse it", err)
		}
	})
	t.Run("startupProbe", func(t *testing.T) {
		objs, _ := render(t, nil)
		_, c := relayContainer(t, objs)
		if c.StartupProbe == nil || c.StartupProbe.HTTPGet == nil {
			t.Fatalf("the relay container has no startupProbe")
		}
		p := c.StartupProbe
		t.Logf("startupProbe %s every %ds, %d failures", p.HTTPGet.Path, p.PeriodSeconds, p.FailureThreshold)
	})
	t.Run("networkPolicy", func(t *testing.T) {
		objs, _ := render(t, nil)
		for _, o := range objs {
			if o.Kind == "NetworkPolicy" {
				t.Errorf("%s rendered by default", o)
			}
		}
		from := []any{map[string]any{"namespaceSelector": map[string]any{"matchLabels": map[string]any{"kubernetes.io/metadata.name": "monitoring"}}}}
		objs, _ = render(t, map[string]any{"networkPolicy": map[string]any{"enabled": true, "metricsFrom": from}})
		dep, c := relayContainer(t, objs)
		var np *networkingv1.NetworkPolicy
		for _, o := range objs {
			if v, ok := o.Obj.(*networkingv1.NetworkPolicy); ok {
				np = v
			}
		}
		if np == nil {
			t.Fatal("networkPolicy.enabled: no NetworkPolicy rendered")
		}
		sel, err := metav1.LabelSelectorAsSelector(&np.Spec.PodSelector)
		if err != nil || sel.Empty() || !sel.Matches(labels.Set(dep.Spec.Template.Labels)) {
			t.Errorf("NetworkPolicy %s does not select the relay pods (%v)", np.Name, err)
		}
		if len(np.Spec.Ingress) != 1 || len(np.Spec.Ingress[0].Ports) != 1 || len(np.Spec.Ingress[0].From) != 1 {
			t.Fatalf("NetworkPolicy %s: ingress %+v, want one rule: the metrics port from metricsFrom", np.Name, np.Spec.Ingress)
		}
		port := np.Spec.Ingress[0].Ports[0].Port
		if got, ok := resolvePort(*port, c); !ok || got != c.Ports[0].ContainerPort {
			t.Errorf("NetworkPolicy %s admits port %s, not the metrics port %d", np.Name, port.String(), c.Ports[0].ContainerPort)
		}
	})
	t.Run("commonLabels and podAnnotations", func(t *testing.T) {
		objs, _ := render(t, map[string]any{
			"commonLabels":   map[string]any{"team": "payments"},
			"podAnnotations": map[string]any{"example.com/owner": "payments"},
			"serviceMonitor": map[string]any{"enabled": true}, "prometheusRule": map[string]any{"enabled": true},
			"networkPolicy": map[string]any{"enabled": true}, "secret": map[string]any{"create": true, "databaseURL": "postgres://outbox_relay@db/app"},
			"migration": map[string]any{"databaseURL": "postgres://outbox_admin@db/app"},
		})
		for _, o := range objs {
			m, ok := o.Obj.(metav1.Object)
			if !ok || m.GetLabels()["team"] != "payments" {
				t.Errorf("%s has no commonLabels team=payments (labels %v)", o, m.GetLabels())
			}
			if meta, pod := podOf(o); pod != nil && meta.Labels["team"] != "payments" {
				t.Errorf("%s: its pods have no commonLabels team=payments", o)
			}
		}
		dep, _ := relayContainer(t, objs)
		if dep.Spec.Template.Annotations["example.com/owner"] != "payments" {
			t.Errorf("podAnnotations: the relay pods' annotations are %v", dep.Spec.Template.Annotations)
		}
	})
	t.Run("environment from Secrets", func(t *testing.T) {
		objs, _ := render(t, map[string]any{
			"extraEnv": []any{map[string]any{"name": "PGSSLPASSWORD", "valueFrom": map[string]any{
				"secretKeyRef": map[string]any{"name": "pg-client-key", "key": "password"}}}},
			"extraEnvFrom": []any{map[string]any{"secretRef": map[string]any{"name": "kafka-sasl"}}},
		})
		_, c := relayContainer(t, objs)
		found := false
		for _, e := range c.Env {
			found = found || (e.Name == "PGSSLPASSWORD" && e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil && e.ValueFrom.SecretKeyRef.Name == "pg-client-key")
		}
		if !found {
			t.Errorf("extraEnv from a Secret: not in the relay container's env %+v", c.Env)
		}
		if !slices.ContainsFunc(c.EnvFrom, func(f corev1.EnvFromSource) bool { return f.SecretRef != nil && f.SecretRef.Name == "kafka-sasl" }) {
			t.Errorf("extraEnvFrom: the relay container's envFrom is %+v", c.EnvFrom)
		}
	})
	t.Run("helm test runs status", func(t *testing.T) {
		objs, r := render(t, nil)
		_, relay := relayContainer(t, objs)
		relaySource := databaseURLSource(relay, objs)
		found := 0
		for _, h := range r.Hooks {
			var events []string
			for _, e := range h.Events {
				events = append(events, e.String())
			}
			if !slices.Contains(events, "test") {
				continue
			}
			hobjs, err := DecodeStrict("hook "+h.Path, []byte(h.Manifest))
			if err != nil {
				t.Fatal(err)
			}
			for _, o := range hobjs {
				pod, ok := o.Obj.(*corev1.Pod)
				if !ok {
					continue
				}
				found++
				if pod.Spec.RestartPolicy != corev1.RestartPolicyNever {
					t.Errorf("%s: restartPolicy %q, want Never (a test runs once)", o, pod.Spec.RestartPolicy)
				}
				for _, c := range pod.Spec.Containers {
					if !slices.Equal(append(append([]string{}, c.Command...), c.Args...), []string{"status"}) {
						t.Errorf("%s: container %s runs %v, want [status]", o, c.Name, append(c.Command, c.Args...))
					}
					if got := databaseURLSource(c, objs); got != relaySource {
						t.Errorf("%s: reads OUTBOX_DATABASE_URL from %s, want the relay's %s (status is the relay role's)", o, got, relaySource)
					}
					if c.Image != relay.Image {
						t.Errorf("%s: image %s, not the relay's %s", o, c.Image, relay.Image)
					}
				}
			}
		}
		if found != 1 {
			t.Errorf("%d `helm test` pods, want one running `outbox-relay status`", found)
		}
	})
}
