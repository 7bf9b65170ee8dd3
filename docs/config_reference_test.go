package docs

import (
	"flag"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
)

// update rewrites the generated block of configuration.md:
// go test ./docs -run TestConfigurationReference -update (go generate ./docs).
var update = flag.Bool("update", false, "rewrite the generated block of docs/configuration.md")

const (
	beginGenerated = "<!-- BEGIN GENERATED: go generate ./docs (from the env tags and doc comments of relay.Config); do not edit -->"
	endGenerated   = "<!-- END GENERATED -->"
)

// configSources are the files holding relay.Config and the structs it nests
// (by package name).
var configSources = map[string]string{
	"relay":     filepath.Join("..", "relay", "config.go"),
	"kafkaauth": filepath.Join("..", "kafkaauth", "kafkaauth.go"),
	"pgauth":    filepath.Join("..", "pgauth", "pgauth.go"),
}

// structs parses configSources and returns their struct types by
// "package.Type".
func structs(t *testing.T) map[string]*ast.StructType {
	t.Helper()
	out := map[string]*ast.StructType{}
	fset := token.NewFileSet()
	for pkg, path := range configSources {
		f, err := parser.ParseFile(fset, path, nil, parser.ParseComments)
		if err != nil {
			t.Fatalf("parse %s: %v", path, err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			if ts, ok := n.(*ast.TypeSpec); ok {
				if st, ok := ts.Type.(*ast.StructType); ok {
					out[pkg+"."+ts.Name.Name] = st
				}
			}
			return true
		})
	}
	return out
}

// generateReference renders one table row per env-tagged field of
// relay.Config and of the structs it nests: variable, default, required,
// Go field, doc comment.
func generateReference(t *testing.T) string {
	t.Helper()
	types := structs(t)
	var b strings.Builder
	b.WriteString("| variable | default | required | Go field | doc comment |\n| --- | --- | --- | --- | --- |\n")
	var walk func(pkg, typ, prefix string)
	walk = func(pkg, typ, prefix string) {
		st, ok := types[pkg+"."+typ]
		if !ok {
			t.Fatalf("struct %s.%s not found in %v", pkg, typ, configSources)
		}
		doc := ""
		for _, f := range st.Fields.List {
			if f.Doc != nil {
				doc = strings.Join(strings.Fields(f.Doc.Text()), " ")
			}
			var tag reflect.StructTag
			if f.Tag != nil {
				s, err := strconv.Unquote(f.Tag.Value)
				if err != nil {
					t.Fatal(err)
				}
				tag = reflect.StructTag(s)
			}
			env, hasEnv := tag.Lookup("env")
			if !hasEnv {
				var np, nt string
				switch x := f.Type.(type) {
				case *ast.SelectorExpr:
					np, nt = x.X.(*ast.Ident).Name, x.Sel.Name
				case *ast.Ident:
					np, nt = pkg, x.Name
				}
				if _, ok := types[np+"."+nt]; ok && len(f.Names) == 1 {
					walk(np, nt, prefix+f.Names[0].Name+".")
				}
				continue
			}
			parts := strings.Split(env, ",")
			required := ""
			for _, p := range parts[1:] {
				if p == "required" {
					required = "yes"
				}
			}
			def := "(none)"
			if d, ok := tag.Lookup("envDefault"); ok {
				def = "`" + d + "`"
			}
			for _, n := range f.Names {
				fmt.Fprintf(&b, "| `%s` | %s | %s | `%s%s` | %s |\n", parts[0], def, required, prefix, n.Name, strings.NewReplacer("|", `\|`, "<", "&lt;").Replace(doc))
			}
		}
	}
	walk("relay", "Config", "")
	return b.String()
}

// TestConfigurationReference: the generated block of docs/configuration.md
// is what the code's env tags, defaults and doc comments give today.
func TestConfigurationReference(t *testing.T) {
	const path = "configuration.md"
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	text := string(b)
	i, j := strings.Index(text, beginGenerated), strings.Index(text, endGenerated)
	if i < 0 || j < i {
		t.Fatalf("%s has no block between %q and %q", path, beginGenerated, endGenerated)
	}
	want := generateReference(t)
	got := text[i+len(beginGenerated)+1 : j]
	if got == want {
		return
	}
	if *update {
		if err := os.WriteFile(path, []byte(text[:i+len(beginGenerated)+1]+want+text[j:]), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	t.Errorf("docs/configuration.md's generated reference differs from the code's env tags and doc comments: run go generate ./docs (go test ./docs -run TestConfigurationReference -update)\n--- in the file:\n%s\n--- from the code:\n%s", got, want)
}
