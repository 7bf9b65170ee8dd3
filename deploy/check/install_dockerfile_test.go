package check

import (
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// TestDockerfileStampsVersionAndCommit: deploy/Dockerfile sets the
// version and the commit with -ldflags -X, and each name it sets is a
// string variable of package main in cmd/outbox-relay (-X ignores a name
// that does not exist, silently).
func TestDockerfileStampsVersionAndCommit(t *testing.T) {
	root := repoRoot(t)
	b, err := os.ReadFile(filepath.Join(root, "deploy", "Dockerfile"))
	if err != nil {
		t.Fatal(err)
	}
	var set []string
	for _, m := range regexp.MustCompile(`-X main\.([A-Za-z0-9_]+)=(\S*)`).FindAllStringSubmatch(string(b), -1) {
		set = append(set, m[1])
	}
	vars := map[string]bool{}
	fset := token.NewFileSet()
	files, _ := filepath.Glob(filepath.Join(root, "cmd", "outbox-relay", "*.go"))
	for _, f := range files {
		if strings.HasSuffix(f, "_test.go") {
			continue
		}
		af, err := parser.ParseFile(fset, f, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, d := range af.Decls {
			g, ok := d.(*ast.GenDecl)
			if !ok || g.Tok != token.VAR {
				continue
			}
			for _, s := range g.Specs {
				vs := s.(*ast.ValueSpec)
				if id, ok := vs.Type.(*ast.Ident); ok && id.Name == "string" {
					for _, n := range vs.Names {
						vars[n.Name] = true
					}
				}
			}
		}
	}
	for _, name := range set {
		if !vars[name] {
			t.Errorf("deploy/Dockerfile sets main.%s, which is no string variable of cmd/outbox-relay: -X ignores it", name)
		}
	}
	for _, want := range []string{"buildVersion", "buildCommit"} {
		if !slices.Contains(set, want) {
			t.Errorf("deploy/Dockerfile does not set main.%s (-ldflags -X): `outbox-relay version` of the image cannot say it", want)
		}
	}
	t.Logf("deploy/Dockerfile sets %v", set)
}
