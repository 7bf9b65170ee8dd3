package docs

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"unicode"
)

// link is a Markdown inline link's target: [text](target).
var link = regexp.MustCompile(`\]\(([^)\s]+)\)`)

// htmlAnchor is an explicit anchor: <a id="name"></a> (or name=).
var htmlAnchor = regexp.MustCompile(`<a (?:id|name)="([^"]+)"`)

// heading is an ATX heading line.
var heading = regexp.MustCompile(`^#{1,6} +(.*?) *#*$`)

// slug returns GitHub's anchor for a heading's text: lower case, every
// character but letters, digits, '-', '_' and spaces dropped, spaces made '-'.
func slug(h string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(h) {
		switch {
		case unicode.IsLetter(r), unicode.IsDigit(r), r == '-', r == '_':
			b.WriteRune(r)
		case r == ' ':
			b.WriteByte('-')
		}
	}
	return b.String()
}

// anchors returns the anchors of a Markdown file's headings and <a id>
// tags (outside code blocks), repeated headings numbered as GitHub does (-1, -2, ...).
func anchors(text string) map[string]bool {
	got := map[string]bool{}
	seen := map[string]int{}
	fenced := false
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
			continue
		}
		if fenced {
			continue
		}
		for _, a := range htmlAnchor.FindAllStringSubmatch(line, -1) {
			got[a[1]] = true
		}
		m := heading.FindStringSubmatch(line)
		if m == nil {
			continue
		}
		s := slug(m[1])
		if n := seen[s]; n > 0 {
			got[s+"-"+itoa(n)] = true
		} else {
			got[s] = true
		}
		seen[s]++
	}
	return got
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}

// stripCode drops fenced code blocks, where a "](" is not a link.
func stripCode(text string) string {
	var out []string
	fenced := false
	for _, line := range strings.Split(text, "\n") {
		if strings.HasPrefix(line, "```") {
			fenced = !fenced
			continue
		}
		if !fenced {
			out = append(out, line)
		}
	}
	return strings.Join(out, "\n")
}

// TestNoDeadRelativeLink: every relative link of README.md and docs/*.md
// names a file or directory that exists, and its #anchor, if any, a heading
// of the Markdown file it names.
func TestNoDeadRelativeLink(t *testing.T) {
	files, err := filepath.Glob("*.md")
	if err != nil {
		t.Fatal(err)
	}
	files = append([]string{filepath.Join("..", "README.md")}, files...)
	if len(files) < 2 {
		t.Fatal("no docs/*.md found")
	}
	checked := 0
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range link.FindAllStringSubmatch(stripCode(string(b)), -1) {
			target := m[1]
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			path, frag, _ := strings.Cut(target, "#")
			file := f
			if path != "" {
				file = filepath.Join(filepath.Dir(f), path)
				if _, err := os.Stat(file); err != nil {
					t.Errorf("%s: link %q: %s does not exist", f, target, file)
					continue
				}
			}
			checked++
			if frag == "" {
				continue
			}
			if !strings.HasSuffix(file, ".md") {
				t.Errorf("%s: link %q: an anchor into %s, which is not Markdown", f, target, file)
				continue
			}
			tb, err := os.ReadFile(file)
			if err != nil {
				t.Errorf("%s: link %q: %v", f, target, err)
				continue
			}
			if !anchors(string(tb))[frag] {
				t.Errorf("%s: link %q: %s has no heading whose anchor is #%s", f, target, file, frag)
			}
		}
	}
	if checked == 0 {
		t.Fatal("no relative link checked: the pattern is broken")
	}
	t.Logf("%d relative links checked in %d files", checked, len(files))
}

// TestSlug: GitHub's anchors for headings of these files.
func TestSlug(t *testing.T) {
	for h, want := range map[string]string{
		"Consuming exactly once: the inbox package":                  "consuming-exactly-once-the-inbox-package",
		"Reading the WAL: `OUTBOX_SOURCE=replication` (first stage)": "reading-the-wal-outbox_sourcereplication-first-stage",
		"7. Inbox throughput (`BenchmarkInboxThroughput`)":           "7-inbox-throughput-benchmarkinboxthroughput",
	} {
		if got := slug(h); got != want {
			t.Errorf("slug(%q) = %q, want %q", h, got, want)
		}
	}
}

// runbookURL is where an alert's runbook_url points: its section of
// docs/operations.md, on the project's main branch.
const runbookURL = "https://github.com/outbox-relay/outbox-relay/blob/main/docs/operations.md#"

// TestEveryAlertLinksToItsRunbook: every alert of
// deploy/prometheus/alerts.yaml has a runbook_url to docs/operations.md
// whose anchor is a heading there (the alert's own section).
func TestEveryAlertLinksToItsRunbook(t *testing.T) {
	b, err := os.ReadFile(filepath.Join("..", "deploy", "prometheus", "alerts.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ops, err := os.ReadFile("operations.md")
	if err != nil {
		t.Fatal(err)
	}
	have := anchors(string(ops))
	alert := regexp.MustCompile(`(?m)^\s*- alert: (\S+)\s*$`)
	url := regexp.MustCompile(`(?m)^\s*runbook_url: "?([^"\s]+)"?\s*$`)
	starts := alert.FindAllStringSubmatchIndex(string(b), -1)
	if len(starts) == 0 {
		t.Fatal("alerts.yaml has no alert")
	}
	for i, s := range starts {
		name := string(b[s[2]:s[3]])
		end := len(b)
		if i+1 < len(starts) {
			end = starts[i+1][0]
		}
		m := url.FindSubmatch(b[s[1]:end])
		if m == nil {
			t.Errorf("alert %s has no runbook_url annotation: add runbook_url: %q and a section \"### %s\" to docs/operations.md", name, runbookURL+slug(name), name)
			continue
		}
		got := string(m[1])
		if got != runbookURL+slug(name) {
			t.Errorf("alert %s: runbook_url %q, want %q", name, got, runbookURL+slug(name))
		}
		if !have[slug(name)] {
			t.Errorf("alert %s: docs/operations.md has no section \"### %s\" (anchor #%s)", name, name, slug(name))
		}
	}
}
