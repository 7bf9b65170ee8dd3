// Package envnames knows which OUTBOX_* environment variables the relay
// reads, and refuses the others at start: a misspelt variable
// (OUTBOX_BATCHSIZE) or one the relay does not have (a Kafka property
// outside its list) would otherwise be ignored without a word, and the
// relay would run with the default the operator meant to change.
//
// The known names are derived from the `env:"NAME,..."` tags of the
// configuration structs (relay.Config), plus the few names a program reads
// by hand, so that a new field is known without a second list.
package envnames

import (
	"fmt"
	"reflect"
	"regexp"
	"sort"
	"strings"
)

// Prefix is the prefix of the relay's variables: every variable with it
// is either known or refused (unless exempt).
const Prefix = "OUTBOX_"

// Known is a set of variable names a program reads.
type Known struct {
	names map[string]bool
	// hints maps a name the relay does not read to the variable that does
	// its job and why (Kafka properties franz-go has under another name).
	hints map[string]string
}

// FromStructs returns the names in the env tags of the fields of the given
// struct values (and of their embedded or nested structs, caarlos0/env's
// envPrefix included), plus extra.
func FromStructs(extra []string, structs ...any) Known {
	k := Known{names: map[string]bool{}, hints: map[string]string{}}
	for _, s := range structs {
		k.addStruct(reflect.TypeOf(s), "")
	}
	for _, n := range extra {
		k.names[n] = true
	}
	return k
}

func (k Known) addStruct(t reflect.Type, prefix string) {
	for t.Kind() == reflect.Pointer {
		t = t.Elem()
	}
	if t.Kind() != reflect.Struct {
		return
	}
	for i := range t.NumField() {
		f := t.Field(i)
		ft := f.Type
		for ft.Kind() == reflect.Pointer {
			ft = ft.Elem()
		}
		name, _, _ := strings.Cut(f.Tag.Get("env"), ",")
		switch {
		case name != "" && name != "-":
			k.names[prefix+name] = true
		case ft.Kind() == reflect.Struct && name != "-":
			k.addStruct(ft, prefix+f.Tag.Get("envPrefix"))
		}
	}
}

// WithHint returns k with a hint for name, a variable the relay does not
// read: the error for it says "did you mean" the hint instead of the
// nearest spelling.
func (k Known) WithHint(name, hint string) Known {
	k.hints[name] = hint
	return k
}

// KafkaVariable returns the variable the README's naming rule gives a
// Kafka property: OUTBOX_KAFKA_ and the property in upper case with _ for
// . (max.request.size: OUTBOX_KAFKA_MAX_REQUEST_SIZE).
func KafkaVariable(property string) string {
	return Prefix + "KAFKA_" + strings.ToUpper(strings.ReplaceAll(property, ".", "_"))
}

// Hinted reports whether name is a variable the relay does not read but
// has a hint for (WithHint).
func (k Known) Hinted(name string) bool { _, ok := k.hints[name]; return ok }

// Has reports whether name is known.
func (k Known) Has(name string) bool { return k.names[name] }

// Names returns the known names, sorted.
func (k Known) Names() []string {
	out := make([]string, 0, len(k.names))
	for n := range k.names {
		out = append(out, n)
	}
	sort.Strings(out)
	return out
}

// exemptPrefixes and exemptNames are the OUTBOX_* variables of the tests,
// benchmarks and soak scripts (README "Configuration": "Unknown
// variables"), which reach the relay when a test starts its binary.
var (
	exemptPrefixes = []string{"OUTBOX_TEST_", "OUTBOX_BENCH_", "OUTBOX_PG_"}
	// A pattern rather than the names: deploy/check counts a string that
	// is exactly a variable name as one the relay reads.
	exemptNames = regexp.MustCompile(`^OUTBOX_(?:KILL|INBOX_KILL|REPL_KILL|ADV)_ROUNDS$`)
	// serviceLink matches the variables Kubernetes sets in every pod for
	// each Service of its namespace (enableServiceLinks, on by default):
	// a Service named outbox-relay-metrics gives
	// OUTBOX_RELAY_METRICS_SERVICE_HOST, ..._PORT_9090_TCP_ADDR and so on.
	serviceLink = regexp.MustCompile(`^OUTBOX_(?:[A-Z0-9_]+_)?(?:SERVICE_HOST|SERVICE_PORT(?:_[A-Z0-9_]+)?|PORT(?:_[0-9]+_(?:TCP|UDP|SCTP)(?:_(?:PROTO|PORT|ADDR))?)?)$`)
)

// Exempt reports whether name, an OUTBOX_* variable, is not the relay's to
// judge: the tests' and soaks' variables (OUTBOX_TEST_*, OUTBOX_BENCH_*,
// OUTBOX_PG_*, OUTBOX_KILL_ROUNDS, OUTBOX_INBOX_KILL_ROUNDS, OUTBOX_REPL_KILL_ROUNDS,
// OUTBOX_ADV_ROUNDS) and Kubernetes' service links (*_SERVICE_HOST,
// *_SERVICE_PORT*, *_PORT, *_PORT_<n>_<proto>*).
func Exempt(name string) bool {
	if exemptNames.MatchString(name) {
		return true
	}
	for _, p := range exemptPrefixes {
		if strings.HasPrefix(name, p) {
			return true
		}
	}
	return serviceLink.MatchString(name)
}

// Check returns an error naming every OUTBOX_* variable of environ
// (KEY=VALUE strings, as os.Environ returns) that k does not know and that
// is not Exempt, each with the variable it most likely meant; nil when
// there is none.
func (k Known) Check(environ []string) error {
	var unknown []string
	seen := map[string]bool{}
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !strings.HasPrefix(name, Prefix) || k.names[name] || Exempt(name) || seen[name] {
			continue
		}
		seen[name] = true
		unknown = append(unknown, name)
	}
	if len(unknown) == 0 {
		return nil
	}
	sort.Strings(unknown)
	lines := make([]string, 0, len(unknown))
	for _, name := range unknown {
		lines = append(lines, fmt.Sprintf("%s is not a variable the relay reads: did you mean %s?", name, k.suggest(name)))
	}
	return fmt.Errorf("%s (unknown OUTBOX_* variables are refused, not ignored: unset or rename them; the relay reads %d, docs/configuration.md)",
		strings.Join(lines, "; "), len(k.names))
}

// suggest returns the known variable name most likely meant: a hint, a
// known name that holds all its words (OUTBOX_SHARD in OUTBOX_SHARDS),
// else the nearest spelling.
func (k Known) suggest(name string) string {
	if h, ok := k.hints[name]; ok {
		return h
	}
	stem := strings.TrimPrefix(name, Prefix)
	best, bestD := "", 1<<30
	for _, n := range k.Names() {
		d := editDistance(name, n)
		if strings.Contains(n, stem) {
			d -= 100
		}
		if d < bestD {
			best, bestD = n, d
		}
	}
	return best
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
