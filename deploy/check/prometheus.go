package check

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"regexp"
	"sort"
	"strings"

	"github.com/prometheus/common/model"
	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/model/rulefmt"
	"github.com/prometheus/prometheus/promql/parser"
	"sigs.k8s.io/yaml"
)

// promql is Prometheus' own PromQL parser, with its default functions.
var promql = parser.NewParser(parser.Options{})

// scrapeMetrics are the series Prometheus itself adds to every target; a
// query may use them although the relay does not register them.
var scrapeMetrics = map[string]bool{"up": true, "scrape_duration_seconds": true, "scrape_samples_scraped": true}

// Query is one PromQL expression and where it was found.
type Query struct {
	Where string
	Expr  string
}

// ExprMetrics parses a PromQL expression with Prometheus' parser and
// returns the metric names its selectors use, sorted. A selector with no
// metric name (only label matchers) is an error: it could match anything.
func ExprMetrics(expr string) ([]string, error) {
	e, err := promql.ParseExpr(expr)
	if err != nil {
		return nil, fmt.Errorf("PromQL %q: %w", expr, err)
	}
	seen := map[string]bool{}
	var problems []string
	parser.Inspect(e, func(n parser.Node, _ []parser.Node) error {
		vs, ok := n.(*parser.VectorSelector)
		if !ok {
			return nil
		}
		name := vs.Name
		for _, m := range vs.LabelMatchers {
			if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
				name = m.Value
			}
		}
		if name == "" {
			problems = append(problems, fmt.Sprintf("selector %s names no metric", vs))
			return nil
		}
		seen[name] = true
		return nil
	})
	if len(problems) > 0 {
		return nil, fmt.Errorf("PromQL %q: %s", expr, strings.Join(problems, "; "))
	}
	out := make([]string, 0, len(seen))
	for n := range seen {
		out = append(out, n)
	}
	sort.Strings(out)
	return out, nil
}

// CheckQueries parses every query and returns an error for each that does
// not parse or uses a series the relay does not register (series maps the
// relay's series names; Prometheus' own up and scrape_* are allowed).
func CheckQueries(queries []Query, series map[string]Metric) []error {
	var errs []error
	for _, q := range queries {
		names, err := ExprMetrics(q.Expr)
		if err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", q.Where, err))
			continue
		}
		for _, n := range names {
			if _, ok := series[n]; !ok && !scrapeMetrics[n] {
				errs = append(errs, fmt.Errorf("%s: metric %s is not registered by the relay (relay/metrics.go)%s", q.Where, n, suggestMetric(n, series)))
			}
		}
	}
	return errs
}

func suggestMetric(name string, series map[string]Metric) string {
	best, bestD := "", 1<<30
	for s := range series {
		if d := editDistance(name, s); d < bestD || (d == bestD && s < best) {
			best, bestD = s, d
		}
	}
	if best == "" {
		return ""
	}
	return fmt.Sprintf("; did you mean %s?", best)
}

// ParseRules reads a Prometheus rule file with Prometheus' own rule parser
// in strict mode (rulefmt.Parse, as `promtool check rules` and the server
// load it): an unknown field, an invalid expression or template is an
// error. It returns the groups and every rule's expression.
func ParseRules(source string, content []byte) (*rulefmt.RuleGroups, []Query, error) {
	groups, errs := rulefmt.Parse(content, false, model.UTF8Validation, promql, slog.New(slog.NewTextHandler(io.Discard, nil)))
	if len(errs) > 0 {
		msgs := make([]string, len(errs))
		for i, e := range errs {
			msgs[i] = e.Error()
		}
		return nil, nil, fmt.Errorf("%s: %s", source, strings.Join(msgs, "; "))
	}
	var qs []Query
	for _, g := range groups.Groups {
		for _, r := range g.Rules {
			name := r.Alert
			if name == "" {
				name = r.Record
			}
			qs = append(qs, Query{Where: fmt.Sprintf("%s: group %s, rule %s", source, g.Name, name), Expr: r.Expr})
		}
	}
	if len(qs) == 0 {
		return nil, nil, fmt.Errorf("%s: no rules", source)
	}
	return groups, qs, nil
}

// RuleTestSeries returns the metric names of the input series of a promtool
// rule test file (promtool test rules), parsed with Prometheus' series
// parser.
func RuleTestSeries(source string, content []byte) (map[string]string, error) {
	var f struct {
		RuleFiles []string `json:"rule_files"`
		Tests     []struct {
			InputSeries []struct {
				Series string `json:"series"`
			} `json:"input_series"`
		} `json:"tests"`
	}
	if err := yaml.Unmarshal(content, &f); err != nil {
		return nil, fmt.Errorf("%s: %w", source, err)
	}
	out := map[string]string{}
	for i, t := range f.Tests {
		for _, s := range t.InputSeries {
			lbls, _, err := promql.ParseSeriesDesc(s.Series)
			if err != nil {
				return nil, fmt.Errorf("%s: test %d: series %q: %w", source, i+1, s.Series, err)
			}
			out[lbls.Get(labels.MetricName)] = fmt.Sprintf("%s: test %d", source, i+1)
		}
	}
	return out, nil
}

// grafanaVar matches Grafana's template variables: $var, ${var}, ${var:fmt}
// and [[var]].
var grafanaVar = regexp.MustCompile(`\$\{[^}]+\}|\$[A-Za-z_][A-Za-z0-9_]*|\[\[[^\]]+\]\]`)

// grafanaToPromQL replaces Grafana's template variables by values that make
// the expression plain PromQL: interval variables ($__rate_interval,
// $__interval, $__range) by a duration, any other by a label value.
func grafanaToPromQL(expr string) string {
	return grafanaVar.ReplaceAllStringFunc(expr, func(v string) string {
		name := strings.Trim(v, "${}[]")
		name, _, _ = strings.Cut(name, ":")
		switch name {
		case "__rate_interval", "__interval", "__range", "__auto_interval":
			return "5m"
		case "__interval_ms", "__range_ms", "__range_s":
			return "300000"
		}
		return "x"
	})
}

// labelValues matches Grafana's label_values(metric, label) and
// label_values(label) variable queries.
var labelValues = regexp.MustCompile(`^\s*label_values\(\s*(.*?)\s*,\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*$`)

// DashboardQueries reads a Grafana dashboard (JSON) and returns the PromQL
// of every panel target ("expr") and of every templating variable of the
// query type (label_values(...) or query_result(...)), Grafana variables
// replaced so that Prometheus' parser reads them. A dashboard with no
// query is an error.
func DashboardQueries(path string) ([]Query, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("dashboard: %w", err)
	}
	var d any
	if err := json.Unmarshal(b, &d); err != nil {
		return nil, fmt.Errorf("dashboard %s: %w", path, err)
	}
	var qs []Query
	var walk func(v any, where string)
	walk = func(v any, where string) {
		switch v := v.(type) {
		case map[string]any:
			if t, ok := v["title"].(string); ok && t != "" {
				where = where + " > " + t
			} else if n, ok := v["name"].(string); ok && n != "" {
				where = where + " > " + n
			}
			for k, x := range v {
				s, isStr := x.(string)
				switch {
				case k == "expr" && isStr && strings.TrimSpace(s) != "":
					qs = append(qs, Query{Where: where, Expr: grafanaToPromQL(s)})
				case k == "definition" && isStr && strings.TrimSpace(s) != "":
					if q, ok := templateQuery(s); ok {
						qs = append(qs, Query{Where: where + " (variable)", Expr: grafanaToPromQL(q)})
					}
				default:
					walk(x, where)
				}
			}
		case []any:
			for _, x := range v {
				walk(x, where)
			}
		}
	}
	walk(d, path)
	if len(qs) == 0 {
		return nil, errors.New("dashboard " + path + ": no PromQL found")
	}
	sort.Slice(qs, func(i, j int) bool { return qs[i].Where+qs[i].Expr < qs[j].Where+qs[j].Expr })
	return qs, nil
}

// templateQuery returns the PromQL inside a Grafana variable query.
func templateQuery(s string) (string, bool) {
	if m := labelValues.FindStringSubmatch(s); m != nil {
		return m[1], true
	}
	if q, ok := strings.CutPrefix(strings.TrimSpace(s), "query_result("); ok {
		return strings.TrimSuffix(q, ")"), true
	}
	return "", false
}

// Undocumented returns the metrics the README does not name: each must
// appear in code quotes, either whole (`outbox_relay_backlog_rows`) or
// without the outbox_relay_ prefix the README states once (`backlog_rows`),
// optionally followed by its labels (`transaction_aborts_total{reason}`).
func Undocumented(readme []byte, metrics []Metric) []Metric {
	var out []Metric
	for _, m := range metrics {
		// The README names a metric in full, or without its namespace
		// (outbox_relay_ or outbox_inbox_) in a list that states it.
		ns, short := "outbox_relay_", strings.TrimPrefix(m.Name, "outbox_relay_")
		if rest, ok := strings.CutPrefix(m.Name, "outbox_inbox_"); ok {
			ns, short = "outbox_inbox_", rest
		}
		re := regexp.MustCompile("`(" + ns + ")?" + regexp.QuoteMeta(short) + "[`{]")
		if !re.Match(readme) {
			out = append(out, m)
		}
	}
	return out
}

// metricMention matches a relay metric's name in prose.
var metricMention = regexp.MustCompile(`\boutbox_relay_[a-z0-9_]*[a-z0-9]`)

// CheckMentions returns an error for every outbox_relay_* name in text
// (descriptions, comments, annotations) that is neither a metric the relay
// registers nor one of its series: prose about a renamed metric misleads as
// much as a query does.
func CheckMentions(source string, text []byte, metrics []Metric) []error {
	known := SeriesNames(metrics)
	for _, m := range metrics {
		known[m.Name] = m
	}
	var errs []error
	for _, loc := range metricMention.FindAllIndex(text, -1) {
		name := string(text[loc[0]:loc[1]])
		if _, ok := known[name]; !ok {
			line := strings.Count(string(text[:loc[0]]), "\n") + 1
			errs = append(errs, fmt.Errorf("%s:%d: names %s, which the relay does not register%s", source, line, name, suggestMetric(name, known)))
		}
	}
	return errs
}
