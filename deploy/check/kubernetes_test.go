package check

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
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

// TestEveryVariableNamedUnderDeployIsRead: every OUTBOX_* name anywhere in
// the deploy kit's files, comments included (a comment that tells an
// operator to set a variable the relay ignores misleads as much as a
// manifest does), is a variable the relay reads. Patterns such as
// OUTBOX_KAFKA_* are left alone.
func TestEveryVariableNamedUnderDeployIsRead(t *testing.T) {
	root := repoRoot(t)
	vars, err := RelayVariables(root)
	if err != nil {
		t.Fatal(err)
	}
	name := regexp.MustCompile(`OUTBOX_[A-Z0-9_]*[A-Z0-9]`)
	files := 0
	err = filepath.WalkDir(filepath.Join(root, "deploy"), func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && path == filepath.Join(root, "deploy", "check") {
			return filepath.SkipDir // the checks' own tests name wrong variables on purpose
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
		for _, loc := range name.FindAllIndex(b, -1) {
			if rest := b[loc[1]:]; bytes.HasPrefix(rest, []byte("*")) || bytes.HasPrefix(rest, []byte("_*")) {
				continue
			}
			n := string(b[loc[0]:loc[1]])
			if !vars.Has(n) {
				line := bytes.Count(b[:loc[0]], []byte("\n")) + 1
				t.Errorf("%s:%d names %s, which the relay does not read%s", rel, line, n, vars.suggest(n))
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 {
		t.Fatalf("read %d files under deploy/", files)
	}
}
