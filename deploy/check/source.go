package check

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"reflect"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
)

// mainModule is the relay's module path, as its go.mod names it.
const mainModule = "github.com/outbox-relay/outbox-relay"

// RepoRoot returns the root of the relay's repository: the nearest directory
// at or above dir whose go.mod declares the relay's module.
func RepoRoot(dir string) (string, error) {
	abs, err := filepath.Abs(dir)
	if err != nil {
		return "", fmt.Errorf("repository root: %w", err)
	}
	for d := abs; ; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err == nil && regexp.MustCompile(`(?m)^module\s+`+regexp.QuoteMeta(mainModule)+`\s*$`).Match(b) {
			return d, nil
		}
		if filepath.Dir(d) == d {
			return "", fmt.Errorf("repository root: no go.mod of module %s at or above %s", mainModule, abs)
		}
	}
}

// sourceFiles parses the Go files that are built into the relay's binary:
// every non-test .go file of the main module, leaving out the directories
// that hold no part of it (deploy, integration, bench, testdata, hidden ones).
func sourceFiles(root string) (*token.FileSet, map[string][]*ast.File, error) {
	fset := token.NewFileSet()
	byDir := map[string][]*ast.File{}
	err := filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := d.Name()
		if d.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || strings.HasPrefix(name, "_") ||
				name == "testdata" || name == "vendor" ||
				(filepath.Dir(path) == root && (name == "deploy" || name == "integration" || name == "bench"))) {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") {
			return nil
		}
		f, err := parser.ParseFile(fset, path, nil, parser.SkipObjectResolution)
		if err != nil {
			return fmt.Errorf("parse %s: %w", path, err)
		}
		byDir[filepath.Dir(path)] = append(byDir[filepath.Dir(path)], f)
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("read the relay's source under %s: %w", root, err)
	}
	return fset, byDir, nil
}

// Variables are the OUTBOX_* environment variables the relay reads, derived
// from its source.
type Variables struct {
	// Where maps each variable to the first place in the source that names
	// it (file:line).
	Where map[string]string
	// Defaults maps the variables of relay.Config that have an envDefault
	// tag to that default, and OUTBOX_METRICS_ADDR to the relay's
	// DefaultMetricsAddr.
	Defaults map[string]string
	// Required are the variables of relay.Config tagged required.
	Required []string
}

// Has reports whether the relay reads the variable name.
func (v Variables) Has(name string) bool { _, ok := v.Where[name]; return ok }

// Names returns the variables, sorted.
func (v Variables) Names() []string {
	out := make([]string, 0, len(v.Where))
	for n := range v.Where {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// suggest returns ", did you mean X?" with the variable closest to name,
// for messages about a variable the relay does not read.
func (v Variables) suggest(name string) string {
	best, bestD := "", 1<<30
	// OUTBOX_TRANSACTION_TIMEOUT: OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS holds
	// its words; otherwise the nearest spelling.
	stem := strings.TrimPrefix(name, "OUTBOX_")
	for _, n := range v.Names() {
		d := editDistance(name, n)
		if strings.Contains(n, stem) {
			d -= 100
		}
		if d < bestD {
			best, bestD = n, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf(" (did you mean %s? the relay reads %d OUTBOX_* variables, docs/configuration.md)", best, len(v.Where))
}

// editDistance is the Levenshtein distance of a and b.
func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur := make([]int, len(b)+1)
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			cur[j] = min(prev[j]+1, cur[j-1]+1, prev[j-1]+cost)
		}
		prev = cur
	}
	return prev[len(b)]
}

var (
	varName       = regexp.MustCompile(`^OUTBOX_[A-Z0-9_]*[A-Z0-9]$`)
	varNamePrefix = regexp.MustCompile(`^(OUTBOX_[A-Z0-9_]*[A-Z0-9])=$`)
)

// RelayVariables derives the OUTBOX_* variables the relay reads from the
// source of the binary's packages under root, so that a variable added to
// the relay is known here without a copy of the list:
//   - the `env:"NAME,..."` tag of every struct field (relay.Config, read
//     with caarlos0/env);
//   - every string literal that is exactly a variable name, or a name
//     followed by "=": the variables read by hand, such as LoadConfig's
//     OUTBOX_KAFKA_*_MS, the admin commands' OUTBOX_DATABASE_URL,
//     OUTBOX_SCHEMA and OUTBOX_TABLE, and lookups like vars["OUTBOX_METRICS_ADDR"].
//
// Names inside longer strings (error messages) do not count. It fails when
// relay.Config is not found or has no env tags: then the derivation itself
// is out of date.
func RelayVariables(root string) (Variables, error) {
	fset, byDir, err := sourceFiles(root)
	if err != nil {
		return Variables{}, err
	}
	v := Variables{Where: map[string]string{}, Defaults: map[string]string{}}
	add := func(name string, pos token.Pos) {
		if _, ok := v.Where[name]; !ok {
			p := fset.Position(pos)
			rel, _ := filepath.Rel(root, p.Filename)
			v.Where[name] = fmt.Sprintf("%s:%d", rel, p.Line)
		}
	}
	configTags := 0
	for dir, files := range byDir {
		for _, f := range files {
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.TypeSpec:
					st, ok := n.Type.(*ast.StructType)
					if !ok {
						return true
					}
					for _, field := range st.Fields.List {
						if field.Tag == nil {
							continue
						}
						tag, err := strconv.Unquote(field.Tag.Value)
						if err != nil {
							continue
						}
						st := reflect.StructTag(tag)
						name, _, _ := strings.Cut(st.Get("env"), ",")
						if name == "" || name == "-" {
							continue
						}
						add(name, field.Pos())
						if filepath.Base(dir) == "relay" && n.Name.Name == "Config" {
							configTags++
							if d, ok := st.Lookup("envDefault"); ok {
								v.Defaults[name] = d
							}
							if _, opts, _ := strings.Cut(st.Get("env"), ","); slices.Contains(strings.Split(opts, ","), "required") {
								v.Required = append(v.Required, name)
							}
						}
					}
				case *ast.ValueSpec:
					// const DefaultMetricsAddr = ":9090" (LoadConfig's default).
					if filepath.Base(dir) == "relay" && len(n.Names) == 1 && n.Names[0].Name == "DefaultMetricsAddr" && len(n.Values) == 1 {
						if lit, ok := n.Values[0].(*ast.BasicLit); ok && lit.Kind == token.STRING {
							if s, err := strconv.Unquote(lit.Value); err == nil {
								v.Defaults["OUTBOX_METRICS_ADDR"] = s
							}
						}
					}
				case *ast.BasicLit:
					if n.Kind != token.STRING {
						return true
					}
					s, err := strconv.Unquote(n.Value)
					if err != nil {
						return true
					}
					if varName.MatchString(s) {
						add(s, n.Pos())
					} else if m := varNamePrefix.FindStringSubmatch(s); m != nil {
						add(m[1], n.Pos())
					}
				}
				return true
			})
		}
	}
	sort.Strings(v.Required)
	if _, ok := v.Defaults["OUTBOX_METRICS_ADDR"]; !ok {
		return Variables{}, fmt.Errorf("no const DefaultMetricsAddr found in package relay under %s: update deploy/check's RelayVariables", root)
	}
	if configTags == 0 {
		return Variables{}, fmt.Errorf("no env-tagged field of relay.Config found under %s: the relay's configuration moved, update deploy/check's RelayVariables", root)
	}
	return v, nil
}

// Metric is one metric the relay registers.
type Metric struct {
	Name  string // the full name, outbox_relay_...
	Kind  string // counter, gauge, histogram, summary or untyped
	Where string // file:line of its constructor call
}

// Series returns the series names a query may use for the metric: the name
// itself, or for a histogram its _bucket, _sum and _count series.
func (m Metric) Series() []string {
	switch m.Kind {
	case "histogram":
		return []string{m.Name + "_bucket", m.Name + "_sum", m.Name + "_count"}
	case "summary":
		return []string{m.Name, m.Name + "_sum", m.Name + "_count"}
	}
	return []string{m.Name}
}

// metricConstructors maps client_golang's constructors to the kind of
// metric they make.
var metricConstructors = map[string]string{
	"NewCounter": "counter", "NewCounterVec": "counter", "NewCounterFunc": "counter",
	"NewGauge": "gauge", "NewGaugeVec": "gauge", "NewGaugeFunc": "gauge",
	"NewHistogram": "histogram", "NewHistogramVec": "histogram",
	"NewSummary": "summary", "NewSummaryVec": "summary",
	"NewUntypedFunc": "untyped",
}

const clientGolang = "github.com/prometheus/client_golang/prometheus"

// RelayMetrics derives the metrics the relay registers from the source of
// the binary's packages under root: every call of a client_golang
// constructor (prometheus.NewCounterVec(prometheus.CounterOpts{Namespace:
// ns, Name: "..."}), and the promauto ones), its name joined from
// Namespace, Subsystem and Name as prometheus.BuildFQName does, with
// constants resolved. A constructor whose name it cannot resolve is an
// error, never skipped, so that a metric can not go unseen.
func RelayMetrics(root string) ([]Metric, error) {
	fset, byDir, err := sourceFiles(root)
	if err != nil {
		return nil, err
	}
	var metrics []Metric
	var problems []string
	for _, files := range byDir {
		consts := map[string]string{}
		for _, f := range files {
			ast.Inspect(f, func(n ast.Node) bool {
				if vs, ok := n.(*ast.ValueSpec); ok {
					for i, name := range vs.Names {
						if i < len(vs.Values) {
							if lit, ok := vs.Values[i].(*ast.BasicLit); ok && lit.Kind == token.STRING {
								if s, err := strconv.Unquote(lit.Value); err == nil {
									consts[name.Name] = s
								}
							}
						}
					}
				}
				return true
			})
		}
		str := func(e ast.Expr) (string, bool) {
			switch e := e.(type) {
			case *ast.BasicLit:
				if e.Kind == token.STRING {
					s, err := strconv.Unquote(e.Value)
					return s, err == nil
				}
			case *ast.Ident:
				s, ok := consts[e.Name]
				return s, ok
			}
			return "", false
		}
		for _, f := range files {
			pkgs := map[string]bool{} // local names of client_golang and promauto
			for _, imp := range f.Imports {
				path, _ := strconv.Unquote(imp.Path.Value)
				if path != clientGolang && path != clientGolang+"/promauto" {
					continue
				}
				local := filepath.Base(path)
				if imp.Name != nil {
					local = imp.Name.Name
				}
				pkgs[local] = true
			}
			if len(pkgs) == 0 {
				continue
			}
			ast.Inspect(f, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok {
					return true
				}
				// promauto.With(reg).NewCounter(...) has a call as X.
				var x string
				switch fx := sel.X.(type) {
				case *ast.Ident:
					x = fx.Name
				case *ast.CallExpr:
					if s, ok := fx.Fun.(*ast.SelectorExpr); ok {
						if id, ok := s.X.(*ast.Ident); ok {
							x = id.Name
						}
					}
				}
				kind, isCtor := metricConstructors[sel.Sel.Name]
				if !pkgs[x] || !isCtor {
					return true
				}
				pos := fset.Position(call.Pos())
				rel, _ := filepath.Rel(root, pos.Filename)
				where := fmt.Sprintf("%s:%d", rel, pos.Line)
				var opts *ast.CompositeLit
				if len(call.Args) > 0 {
					arg := call.Args[0]
					if u, ok := arg.(*ast.UnaryExpr); ok && u.Op == token.AND {
						arg = u.X
					}
					opts, _ = arg.(*ast.CompositeLit)
				}
				if opts == nil {
					problems = append(problems, fmt.Sprintf("%s: %s.%s's options are not a literal: deploy/check cannot read the metric's name", where, x, sel.Sel.Name))
					return true
				}
				parts := map[string]string{}
				for _, el := range opts.Elts {
					kv, ok := el.(*ast.KeyValueExpr)
					if !ok {
						continue
					}
					key, ok := kv.Key.(*ast.Ident)
					if !ok || (key.Name != "Namespace" && key.Name != "Subsystem" && key.Name != "Name") {
						continue
					}
					s, ok := str(kv.Value)
					if !ok {
						problems = append(problems, fmt.Sprintf("%s: the %s of %s.%s is neither a string literal nor a string constant: deploy/check cannot read the metric's name", where, key.Name, x, sel.Sel.Name))
						return true
					}
					parts[key.Name] = s
				}
				if parts["Name"] == "" {
					problems = append(problems, fmt.Sprintf("%s: %s.%s has no Name", where, x, sel.Sel.Name))
					return true
				}
				var name []string
				for _, k := range []string{"Namespace", "Subsystem", "Name"} {
					if parts[k] != "" {
						name = append(name, parts[k])
					}
				}
				metrics = append(metrics, Metric{Name: strings.Join(name, "_"), Kind: kind, Where: where})
				return true
			})
		}
	}
	if len(problems) > 0 {
		return nil, fmt.Errorf("reading the relay's metrics: %s", strings.Join(problems, "; "))
	}
	if len(metrics) == 0 {
		return nil, fmt.Errorf("no client_golang metric constructor found under %s: the relay's metrics moved, update deploy/check's RelayMetrics", root)
	}
	sort.Slice(metrics, func(i, j int) bool { return metrics[i].Name < metrics[j].Name })
	return metrics, nil
}

// SeriesNames maps every series name a query may use for metrics to its
// metric.
func SeriesNames(metrics []Metric) map[string]Metric {
	out := map[string]Metric{}
	for _, m := range metrics {
		for _, s := range m.Series() {
			out[s] = m
		}
	}
	return out
}
