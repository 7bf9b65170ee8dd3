package check

import (
	"fmt"
	"path"
	"slices"
	"sort"
	"strings"

	"helm.sh/helm/v4/pkg/chart/common"
	"helm.sh/helm/v4/pkg/chart/common/util"
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"helm.sh/helm/v4/pkg/chart/v2/lint"
	"helm.sh/helm/v4/pkg/chart/v2/lint/support"
	"helm.sh/helm/v4/pkg/chart/v2/loader"
	"helm.sh/helm/v4/pkg/engine"
	release "helm.sh/helm/v4/pkg/release/v1"
	releaseutil "helm.sh/helm/v4/pkg/release/v1/util"
	corev1 "k8s.io/api/core/v1"
)

// LintChart runs Helm's linter (`helm lint --strict`: warnings count) on
// the chart in dir with vals over its values.yaml, and returns every
// warning and error. The linter loads the chart, checks Chart.yaml and the
// values against values.schema.json, renders every template and parses the
// output.
func LintChart(dir string, vals map[string]any, namespace string) []error {
	res := lint.RunAll(dir, vals, namespace)
	var errs []error
	for _, m := range res.Messages {
		if m.Severity >= support.WarningSev {
			errs = append(errs, fmt.Errorf("helm lint: %s", m.Error()))
		}
	}
	return errs
}

// Rendered is a chart rendered as `helm install` (client side) would: the
// objects it applies and its hooks.
type Rendered struct {
	Manifests []releaseutil.Manifest
	Hooks     []*release.Hook
	Notes     string
}

// LoadChart loads the chart in dir with Helm's loader.
func LoadChart(dir string) (*chart.Chart, error) {
	ch, err := loader.Load(dir)
	if err != nil {
		return nil, fmt.Errorf("helm: load chart %s: %w", dir, err)
	}
	return ch, nil
}

// RenderChart renders ch for an install of release name in namespace with
// vals (the user's values, as `-f values.yaml` gives them): Helm coalesces
// them with the chart's values, validates them against values.schema.json,
// renders the templates with its engine and sorts the output into hooks
// and manifests in install order.
func RenderChart(ch *chart.Chart, name, namespace string, vals map[string]any) (*Rendered, error) {
	opts := common.ReleaseOptions{Name: name, Namespace: namespace, IsInstall: true, Revision: 1}
	top, err := util.ToRenderValuesWithSchemaValidation(ch, vals, opts, common.DefaultCapabilities, false)
	if err != nil {
		return nil, fmt.Errorf("helm: values: %w", err)
	}
	files, err := engine.Render(ch, top)
	if err != nil {
		return nil, fmt.Errorf("helm: render: %w", err)
	}
	r := &Rendered{}
	for name, content := range files {
		if strings.HasSuffix(name, "NOTES.txt") {
			r.Notes = content
			delete(files, name)
		}
	}
	hooks, manifests, err := releaseutil.SortManifests(files, common.DefaultCapabilities.APIVersions, releaseutil.InstallOrder)
	if err != nil {
		return nil, fmt.Errorf("helm: sort manifests: %w", err)
	}
	r.Manifests, r.Hooks = manifests, hooks
	return r, nil
}

// Objects decodes every manifest and hook strictly; hooks' objects come
// after the manifests', their Source prefixed by "hook ".
func (r *Rendered) Objects() ([]Object, error) {
	var objs []Object
	var problems []string
	for _, m := range r.Manifests {
		o, err := DecodeStrict(m.Name, []byte(m.Content))
		if err != nil {
			problems = append(problems, err.Error())
		}
		objs = append(objs, o...)
	}
	for _, h := range r.Hooks {
		o, err := DecodeStrict("hook "+h.Path, []byte(h.Manifest))
		if err != nil {
			problems = append(problems, err.Error())
		}
		objs = append(objs, o...)
	}
	if len(problems) > 0 {
		return objs, fmt.Errorf("%s", strings.Join(problems, "\n"))
	}
	return objs, nil
}

// CheckHooks checks the rendered hooks: the migration Job runs `migrate up`
// before install and before upgrade, and everything a hook's pod needs
// exists when it runs. A pre-install hook runs before any of the release's
// own objects exist, so a Secret, ConfigMap or ServiceAccount it uses must
// be a hook of lower weight, or not the chart's at all (created by the
// user).
func CheckHooks(r *Rendered) []error {
	var errs []error
	chartObjects := map[string]bool{}
	for _, m := range r.Manifests {
		if m.Head != nil && m.Head.Metadata != nil {
			chartObjects[m.Head.Kind+"/"+m.Head.Metadata.Name] = true
		}
	}
	hookWeight := map[string]int{}
	for _, h := range r.Hooks {
		hookWeight[h.Kind+"/"+h.Name] = h.Weight
	}
	migrate := false
	for _, h := range r.Hooks {
		objs, err := DecodeStrict("hook "+h.Path, []byte(h.Manifest))
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, o := range objs {
			_, pod := podOf(o)
			if pod == nil {
				continue
			}
			var events []string
			for _, e := range h.Events {
				events = append(events, e.String())
			}
			for _, c := range pod.Containers {
				if slices.Equal(c.Args, []string{"migrate", "up"}) {
					migrate = true
					for _, want := range []string{"pre-install", "pre-upgrade"} {
						if !slices.Contains(events, want) {
							errs = append(errs, fmt.Errorf("%s: the migration hook does not run on %s (events %v)", o, want, events))
						}
					}
				}
			}
			for _, ref := range podRefs(pod) {
				w, isHook := hookWeight[ref]
				switch {
				case isHook && w >= h.Weight:
					errs = append(errs, fmt.Errorf("%s: uses %s, a hook of weight %d, not lower than its own %d: it may not exist yet", o, ref, w, h.Weight))
				case !isHook && chartObjects[ref] && slices.Contains(events, "pre-install"):
					errs = append(errs, fmt.Errorf("%s: a pre-install hook uses %s, which the release creates only after its pre-install hooks", o, ref))
				}
			}
		}
	}
	if !migrate {
		errs = append(errs, fmt.Errorf("no hook runs `outbox-relay migrate up`"))
	}
	return errs
}

// podRefs lists the Secrets, ConfigMaps and the ServiceAccount a pod uses,
// as "Kind/name".
func podRefs(pod *corev1.PodSpec) []string {
	seen := map[string]bool{}
	if pod.ServiceAccountName != "" {
		seen["ServiceAccount/"+pod.ServiceAccountName] = true
	}
	for _, v := range pod.Volumes {
		if v.Secret != nil {
			seen["Secret/"+v.Secret.SecretName] = true
		}
		if v.ConfigMap != nil {
			seen["ConfigMap/"+v.ConfigMap.Name] = true
		}
	}
	for _, c := range append(append([]corev1.Container{}, pod.InitContainers...), pod.Containers...) {
		for _, e := range c.Env {
			if e.ValueFrom != nil && e.ValueFrom.SecretKeyRef != nil {
				seen["Secret/"+e.ValueFrom.SecretKeyRef.Name] = true
			}
			if e.ValueFrom != nil && e.ValueFrom.ConfigMapKeyRef != nil {
				seen["ConfigMap/"+e.ValueFrom.ConfigMapKeyRef.Name] = true
			}
		}
		for _, f := range c.EnvFrom {
			if f.SecretRef != nil {
				seen["Secret/"+f.SecretRef.Name] = true
			}
			if f.ConfigMapRef != nil {
				seen["ConfigMap/"+f.ConfigMapRef.Name] = true
			}
		}
	}
	out := make([]string, 0, len(seen))
	for k := range seen {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// ChartFile returns a file of the loaded chart by its path, or nil.
func ChartFile(ch *chart.Chart, name string) []byte {
	for _, f := range ch.Raw {
		if path.Clean(f.Name) == name {
			return f.Data
		}
	}
	return nil
}
