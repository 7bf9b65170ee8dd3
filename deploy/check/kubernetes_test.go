package check

import (
	"path/filepath"
	"testing"
)

// TestKubernetesManifests: deploy/kubernetes builds with kustomize, every
// object decodes strictly into its API type, and the objects agree with the
// relay (variables, probes and ports, security context).
func TestKubernetesManifests(t *testing.T) {
	root := repoRoot(t)
	vars, err := RelayVariables(root)
	if err != nil {
		t.Fatal(err)
	}
	out, err := KustomizeBuild(filepath.Join(root, "deploy", "kubernetes"))
	if err != nil {
		t.Fatal(err)
	}
	objs, err := DecodeStrict("kustomize build deploy/kubernetes", out)
	if err != nil {
		t.Fatal(err)
	}
	kinds := map[string]int{}
	for _, o := range objs {
		kinds[o.Kind]++
	}
	for _, k := range []string{"Deployment", "Job", "Service", "PodDisruptionBudget", "ConfigMap", "Secret"} {
		if kinds[k] == 0 {
			t.Errorf("no %s in deploy/kubernetes (have %v)", k, kinds)
		}
	}
	for _, err := range CheckObjects(objs, vars) {
		t.Error(err)
	}
	t.Logf("%d objects: %v", len(objs), kinds)
}
