package check

import (
	chart "helm.sh/helm/v4/pkg/chart/v2"
	"net/url"
	"os"
	"path/filepath"
	"regexp"
	"sigs.k8s.io/yaml"
	"slices"
	"strings"
	"testing"
)

// The deploy kit installs the first time (issue 21, section 4).

func renderObjects(t *testing.T, ch *chart.Chart, release string, vals map[string]any) ([]Object, *Rendered, error) {
	t.Helper()
	r, err := RenderChart(ch, release, release, vals)
	if err != nil {
		return nil, nil, err
	}
	objs, err := r.Objects()
	if err != nil {
		t.Fatal(err)
	}
	return objs, r, nil
}

// TestMigrationRunsAsTheAdminRole: the Helm chart's migrate hook (default
// values and every ci/ example) and the kustomize Job take the admin role's
// URL, not the relay's: the relay role of the README's grants may not
// CREATE, so `migrate up` with its URL fails on a fresh install.
func TestMigrationRunsAsTheAdminRole(t *testing.T) {
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	for name, vals := range scenarios(t) {
		t.Run("helm "+name, func(t *testing.T) {
			objs, _, err := renderObjects(t, ch, "payments", vals)
			if err != nil {
				t.Fatal(err)
			}
			for _, err := range CheckMigrationRole(objs) {
				t.Error(err)
			}
		})
	}
	t.Run("kustomize", func(t *testing.T) {
		objs, err := kustomizeObjects(t, filepath.Join(repoRoot(t), "deploy", "kubernetes"))
		if err != nil {
			t.Fatal(err)
		}
		for _, err := range CheckMigrationRole(objs) {
			t.Error(err)
		}
	})
}

// quickStart is the README's Helm quick start ("### With Helm", its first
// sh block): the Secrets it creates, its values file and its install.
type quickStart struct {
	namespace string
	secrets   map[string]map[string]string // name: key: value
	values    map[string]any
	release   string
}

func readQuickStart(t *testing.T) quickStart {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot(t), "docs", "deploying.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	i := strings.Index(readme, "\n### With Helm\n")
	if i < 0 {
		t.Fatal(`docs/deploying.md has no "### With Helm" section`)
	}
	m := regexp.MustCompile("(?s)```sh\n(.*?)```").FindStringSubmatch(readme[i:])
	if m == nil {
		t.Fatal(`docs/deploying.md "### With Helm" has no sh block`)
	}
	block := strings.ReplaceAll(m[1], "\\\n", " ")
	qs := quickStart{secrets: map[string]map[string]string{}}
	files := map[string]string{}
	for _, h := range regexp.MustCompile(`(?s)cat >(\S+) <<'EOF'\n(.*?)\nEOF\n`).FindAllStringSubmatch(block, -1) {
		files[h[1]] = h[2]
	}
	block = regexp.MustCompile(`(?s)cat >(\S+) <<'EOF'\n(.*?)\nEOF\n`).ReplaceAllString(block, "")
	for _, line := range strings.Split(block, "\n") {
		f := strings.Fields(line)
		switch {
		case len(f) >= 6 && f[0] == "kubectl" && f[1] == "-n" && f[3] == "create" && f[4] == "secret" && f[5] == "generic":
			name := f[6]
			keys := map[string]string{}
			for _, a := range f[7:] {
				if kv, ok := strings.CutPrefix(a, "--from-literal="); ok {
					k, v, _ := strings.Cut(kv, "=")
					keys[k] = strings.Trim(v, `'"`)
				}
			}
			qs.secrets[name] = keys
		case len(f) >= 3 && f[0] == "helm" && f[1] == "install":
			qs.release = f[2]
			for j := 3; j+1 < len(f); j++ {
				switch f[j] {
				case "-n", "--namespace":
					qs.namespace = f[j+1]
				case "-f", "--values":
					content, ok := files[f[j+1]]
					if !ok {
						t.Fatalf("the quick start installs with -f %s, which it does not write", f[j+1])
					}
					if err := yaml.Unmarshal([]byte(content), &qs.values); err != nil {
						t.Fatalf("the quick start's %s: %v", f[j+1], err)
					}
				}
			}
		}
	}
	if qs.release == "" || qs.namespace == "" {
		t.Fatalf("no `helm install <release> ... -n <namespace>` in the quick start:\n%s", m[1])
	}
	return qs
}

// TestHelmREADMEQuickStartInstalls: the README's Helm quick start, as
// written, renders; every Secret key a pod of it reads (relays, hooks,
// tests) is one the quick start creates (or the chart does); the migration
// reads a URL of the README's admin role (outbox_admin) and the relays one
// of its relay role (outbox_relay), so that with the README's grants the
// pre-install hook may create the tables.
func TestHelmREADMEQuickStartInstalls(t *testing.T) {
	qs := readQuickStart(t)
	ch, err := LoadChart(chartDir(t))
	if err != nil {
		t.Fatal(err)
	}
	r, err := RenderChart(ch, qs.release, qs.namespace, qs.values)
	if err != nil {
		t.Fatalf("the quick start's values do not render: %v", err)
	}
	objs, err := r.Objects()
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range CheckHooks(r) {
		t.Error(err)
	}
	for _, err := range CheckMigrationRole(objs) {
		t.Error(err)
	}
	chartSecrets := map[string]bool{}
	for _, o := range objs {
		if o.Kind == "Secret" {
			chartSecrets[o.Name] = true
		}
	}
	roles := map[string]string{} // container kind: role
	for _, o := range objs {
		_, pod := podOf(o)
		if pod == nil {
			continue
		}
		for _, c := range pod.Containers {
			for _, e := range c.Env {
				if e.ValueFrom == nil || e.ValueFrom.SecretKeyRef == nil {
					continue
				}
				ref := e.ValueFrom.SecretKeyRef
				if chartSecrets[ref.Name] {
					continue
				}
				keys, ok := qs.secrets[ref.Name]
				if !ok {
					t.Errorf("%s: container %s reads Secret %s, which the quick start does not create (it creates %v)", o, c.Name, ref.Name, slices.Sorted(mapKeys(qs.secrets)))
					continue
				}
				v, ok := keys[ref.Key]
				if !ok {
					t.Errorf("%s: container %s reads key %s of Secret %s, which the quick start does not set", o, c.Name, ref.Key, ref.Name)
					continue
				}
				if e.Name == "OUTBOX_DATABASE_URL" {
					u, err := url.Parse(v)
					if err != nil {
						t.Errorf("Secret %s: OUTBOX_DATABASE_URL: %v", ref.Name, err)
						continue
					}
					kind := "relay"
					if isMigration(c) {
						kind = "migration"
					}
					roles[kind+" ("+o.String()+")"] = u.User.Username()
				}
			}
		}
	}
	for who, role := range roles {
		want := "outbox_relay"
		if strings.HasPrefix(who, "migration") {
			want = "outbox_admin"
		}
		if role != want {
			t.Errorf("the %s connects as %q, want the README's %s role", who, role, want)
		}
	}
	if len(roles) < 2 {
		t.Errorf("found the database URLs of %v only, want the relay's and the migration's", roles)
	}
	t.Logf("quick start: release %s in %s, Secrets %v, roles %v", qs.release, qs.namespace, slices.Sorted(mapKeys(qs.secrets)), roles)
}

func mapKeys[V any](m map[string]V) func(func(string) bool) {
	return func(yield func(string) bool) {
		for k := range m {
			if !yield(k) {
				return
			}
		}
	}
}
