package envnames_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/envnames"
	"github.com/outbox-relay/outbox-relay/relay"
)

var (
	name       = regexp.MustCompile(`^OUTBOX_[A-Z0-9_]*[A-Z0-9]$`)
	namePrefix = regexp.MustCompile(`^(OUTBOX_[A-Z0-9_]*[A-Z0-9])=`)
	shellRef   = regexp.MustCompile(`\$\{?(OUTBOX_[A-Z0-9_]*[A-Z0-9])`)
)

// TestEveryVariableTheCodeReadsIsKnown: no OUTBOX_* variable that some
// part of the repository reads is refused at start by mistake. It reads the
// whole repository: in the programs' source every string that is exactly a
// variable name (or a name and "="), in the tests every "NAME=" string
// (the environment they give the relay's binary), in every Go file the
// names passed to os.Getenv and os.LookupEnv, and in the scripts every
// $OUTBOX_* reference; each must be known to relay.KnownVariables or exempt
// (the tests' and soaks' own).
func TestEveryVariableTheCodeReadsIsKnown(t *testing.T) {
	known := relay.KnownVariables()
	root := ".."
	checked := 0
	check := func(n, where string) {
		checked++
		if !known.Has(n) && !envnames.Exempt(n) && !known.Hinted(n) {
			t.Errorf("%s reads %s, which the relay refuses at start: add it to a configuration struct's env tags (or to relay.KnownVariables), or exempt it in package envnames and README \"Unknown variables\"", where, n)
		}
	}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		base := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(base, ".") && base != ".ci" || base == "testdata" || base == "vendor" || base == "node_modules") {
				return filepath.SkipDir
			}
			return nil
		}
		switch {
		case strings.HasSuffix(base, ".go"):
			fset := token.NewFileSet()
			f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
			if err != nil {
				return err
			}
			test := strings.HasSuffix(base, "_test.go")
			// A test's "OUTBOX_X=" strings are the environment it gives a
			// relay (kill_test.go's OUTBOX_TRANSACTION_TIMEOUT=10s was
			// ignored for months): they count, except in the tests of
			// the refusal itself, which use wrong names on purpose.
			src, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			wrongOnPurpose := strings.Contains(string(src), "did you mean")
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.CallExpr:
					sel, ok := n.Fun.(*ast.SelectorExpr)
					if !ok || len(n.Args) == 0 {
						return true
					}
					if x, ok := sel.X.(*ast.Ident); !ok || x.Name != "os" || (sel.Sel.Name != "Getenv" && sel.Sel.Name != "LookupEnv") {
						return true
					}
					if lit, ok := n.Args[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
						if s, err := strconv.Unquote(lit.Value); err == nil && strings.HasPrefix(s, envnames.Prefix) {
							check(s, fset.Position(lit.Pos()).String())
						}
					}
				case *ast.BasicLit:
					if n.Kind != token.STRING || test && wrongOnPurpose {
						return true
					}
					s, err := strconv.Unquote(n.Value)
					if err != nil {
						return true
					}
					if name.MatchString(s) && !test {
						check(s, fset.Position(n.Pos()).String())
					} else if m := namePrefix.FindStringSubmatch(s); m != nil {
						check(m[1], fset.Position(n.Pos()).String())
					}
				}
				return true
			})
		case strings.HasSuffix(base, ".sh") || path == filepath.Join(root, ".ci", "run"):
			b, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, m := range shellRef.FindAllStringSubmatch(string(b), -1) {
				check(m[1], path)
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if checked < 50 {
		t.Fatalf("only %d variable references found under %s: the scan no longer sees the source", checked, root)
	}
	for _, n := range []string{"OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS", "OUTBOX_KAFKA_SASL_PASSWORD", "OUTBOX_STANDBY_NAMES"} {
		if !known.Has(n) {
			t.Errorf("relay.KnownVariables lacks %s", n)
		}
	}
}

// TestKnownComesFromTheTags: a field added to a configuration struct is
// known without a second list, nested and prefixed structs included.
func TestKnownComesFromTheTags(t *testing.T) {
	type inner struct {
		Port int `env:"PORT"`
	}
	type cfg struct {
		A     string `env:"OUTBOX_A,required"`
		B     int    `env:"OUTBOX_B" envDefault:"1"`
		Skip  int    `env:"-"`
		Inner inner  `envPrefix:"OUTBOX_IN_"`
	}
	k := envnames.FromStructs([]string{"OUTBOX_BY_HAND"}, cfg{})
	if got := strings.Join(k.Names(), ","); got != "OUTBOX_A,OUTBOX_B,OUTBOX_BY_HAND,OUTBOX_IN_PORT" {
		t.Fatalf("names %s", got)
	}
	if err := k.Check([]string{"OUTBOX_A=1", "OUTBOX_IN_PORT=2", "PATH=/bin", "OUTBOX_TEST_DB=x"}); err != nil {
		t.Fatal(err)
	}
	if err := k.Check([]string{"OUTBOX_BB=1"}); err == nil || !strings.Contains(err.Error(), "did you mean OUTBOX_B?") {
		t.Fatalf("OUTBOX_BB: %v", err)
	}
}
