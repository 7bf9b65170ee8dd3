package check

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestREADMEPromtoolCommandNeedsOnlyGo: the README's command for the alert
// rules and their unit tests ("Deploying", its first sh block) runs
// promtool through Go (`go run github.com/prometheus/prometheus/cmd/promtool@<v>`),
// so that it works where only Go is installed, at the version of Prometheus
// whose rule parser this check uses (deploy/check/go.mod).
func TestREADMEPromtoolCommandNeedsOnlyGo(t *testing.T) {
	root := repoRoot(t)
	b, err := os.ReadFile(filepath.Join(root, "docs", "deploying.md"))
	if err != nil {
		t.Fatal(err)
	}
	readme := string(b)
	i := strings.Index(readme, "\n## Deploying")
	if i < 0 {
		t.Fatal(`docs/deploying.md has no "## Deploying" section`)
	}
	m := regexp.MustCompile("(?s)```sh\n(.*?)```").FindStringSubmatch(readme[i:])
	if m == nil {
		t.Fatal(`"## Deploying" has no sh block`)
	}
	gomod, err := os.ReadFile(filepath.Join(root, "deploy", "check", "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	want := ""
	if v := regexp.MustCompile(`(?m)^\s+github\.com/prometheus/prometheus (v\S+)$`).FindStringSubmatch(string(gomod)); v != nil {
		want = "go run github.com/prometheus/prometheus/cmd/promtool@" + v[1]
	}
	if want == "" {
		t.Fatal("deploy/check/go.mod does not require github.com/prometheus/prometheus")
	}
	var runs []string
	for _, line := range strings.Split(m[1], "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "#") {
			continue
		}
		if strings.Contains(line, "check rules") || strings.Contains(line, "test rules") {
			runs = append(runs, line)
		}
	}
	if len(runs) == 0 {
		t.Fatalf("the README's deploy block runs no `promtool check rules` / `test rules`:\n%s", m[1])
	}
	viaVariable := regexp.MustCompile(`(?m)^PROMTOOL=.*` + regexp.QuoteMeta(want)).MatchString(m[1])
	for _, line := range runs {
		if !strings.Contains(line, want) && !(viaVariable && strings.Contains(line, "$PROMTOOL")) {
			t.Errorf("the README runs %q: it needs a promtool on PATH, which only .ci/run installs; run it as %q (or through $PROMTOOL, set to it)", strings.TrimSpace(line), want)
		}
	}
}
