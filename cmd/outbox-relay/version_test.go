package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"strings"
	"testing"
)

// buildVersioned builds the binary of the module in dir with extra go build
// flags and returns what `outbox-relay version` prints.
func buildVersioned(t *testing.T, dir string, flags ...string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "outbox-relay")
	args := append(append([]string{"build", "-o", bin}, flags...), "./cmd/outbox-relay")
	cmd := exec.Command("go", args...)
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go %v: %v\n%s", args, err, out)
	}
	out, err := exec.Command(bin, "version").CombinedOutput()
	if err != nil {
		t.Fatalf("outbox-relay version: %v\n%s", err, out)
	}
	return strings.TrimSpace(string(out))
}

// TestVersionPrintsTheVersionAndCommitOfTheBuild: `outbox-relay version`
// prints what the build recorded: the version and commit deploy/Dockerfile
// sets with -ldflags -X, and, for a build from a git checkout (go build,
// go install), the commit Go stamps (vcs.revision) and the module version.
func TestVersionPrintsTheVersionAndCommitOfTheBuild(t *testing.T) {
	if testing.Short() {
		t.Skip("builds the binary twice")
	}
	root, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	if err != nil {
		t.Skipf("not a git checkout (git rev-parse: %v)", err)
	}
	got := buildVersioned(t, strings.TrimSpace(string(root)), "-ldflags", "-X main.buildVersion=v9.8.7 -X main.buildCommit=0123456789abcdef0123456789abcdef01234567")
	t.Logf("with -ldflags -X: %s", got)
	if !strings.Contains(got, "v9.8.7") || !strings.Contains(got, "0123456789abcdef0123456789abcdef01234567") {
		t.Errorf("built with -X main.buildVersion=v9.8.7 -X main.buildCommit=0123...: `version` prints %q, want both", got)
	}

	// A fresh clone at HEAD (Go stamps no VCS information in a git
	// worktree, whose .git is a file), built as go build and go install
	// build from a checkout.
	head, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Fatal(err)
	}
	rev := strings.TrimSpace(string(head))
	clone := t.TempDir()
	for _, args := range [][]string{{"clone", "-q", strings.TrimSpace(string(root)), clone}, {"-C", clone, "checkout", "-q", rev}} {
		if out, err := exec.Command("git", args...).CombinedOutput(); err != nil {
			t.Fatalf("git %v: %v\n%s", args, err, out)
		}
	}
	// This package as it is in the working tree (the clone is then
	// modified: vcs.modified, a +dirty version).
	files, _ := filepath.Glob("*.go")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(clone, "cmd", "outbox-relay", f), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	got = buildVersioned(t, clone, "-buildvcs=true")
	t.Logf("from a clone at HEAD: %s", got)
	if !strings.Contains(got, rev) {
		t.Errorf("built from a checkout at %s: `version` prints %q, without the commit", rev, got)
	}
	if strings.Contains(got, "(devel)") || !regexp.MustCompile(`outbox-relay v[0-9]+\.[0-9]+\.[0-9]+`).MatchString(got) {
		t.Errorf("built from a checkout: `version` prints %q, want a module version (v0.0.0-<time>-<commit> without a tag)", got)
	}
}

// TestDescribeBuildOfGoInstall: what `go install
// github.com/outbox-relay/outbox-relay/cmd/outbox-relay@<version>` records
// (a module version, no VCS settings: it builds from the module zip) is
// printed as such: the tag, whose commit the tag names; a pseudo-version's
// commit; -X values over both.
func TestDescribeBuildOfGoInstall(t *testing.T) {
	for _, tc := range []struct {
		main, ldVersion, ldCommit string
		settings                  []debug.BuildSetting
		version, commit           string
	}{
		{main: "v1.2.3", version: "v1.2.3", commit: "unknown (the tag v1.2.3 names it)"},
		{main: "v0.0.0-20261207120739-0def4a23292c", version: "v0.0.0-20261207120739-0def4a23292c", commit: "0def4a23292c"},
		{main: "v1.2.4-0.20261207120739-0def4a23292c", version: "v1.2.4-0.20261207120739-0def4a23292c", commit: "0def4a23292c"},
		{main: "(devel)", settings: []debug.BuildSetting{{Key: "vcs.revision", Value: "abc"}, {Key: "vcs.modified", Value: "true"}}, version: "(devel)", commit: "abc-dirty"},
		{main: "(devel)", version: "(devel)", commit: "unknown"},
		{main: "v1.2.3", ldVersion: "v9.9.9", ldCommit: "fff", version: "v9.9.9", commit: "fff"},
	} {
		bi := &debug.BuildInfo{Main: debug.Module{Path: "github.com/outbox-relay/outbox-relay", Version: tc.main}, Settings: tc.settings}
		v, c := describeBuild(bi, tc.ldVersion, tc.ldCommit)
		if v != tc.version || c != tc.commit {
			t.Errorf("main module %s, -X %q %q, settings %v: version %q commit %q, want %q %q", tc.main, tc.ldVersion, tc.ldCommit, tc.settings, v, c, tc.version, tc.commit)
		}
	}
}
