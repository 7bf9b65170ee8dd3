package migrations_test

import (
	"os"
	"regexp"
	"strconv"
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/migrations"
)

// TestREADMEDescribesEveryMigration: the README's "The schema and
// migrations" section says what each version creates ("version N ..."),
// for every file in sql/, names no version that does not exist, and counts
// them right where it says "N migrations in all".
func TestREADMEDescribesEveryMigration(t *testing.T) {
	readme, err := os.ReadFile("../docs/schema.md")
	if err != nil {
		t.Fatal(err)
	}
	text := string(readme)
	start := strings.Index(text, "## The schema and migrations")
	if start < 0 {
		t.Fatal(`docs/schema.md has no section "## The schema and migrations"`)
	}
	section := text[start+1:]
	if end := strings.Index(section, "\n## "); end >= 0 {
		section = section[:end]
	}
	section = strings.Join(strings.Fields(section), " ")
	m, err := migrations.New(nil, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	all, err := m.All()
	if err != nil {
		t.Fatal(err)
	}
	described := map[int]bool{}
	for _, v := range regexp.MustCompile(`(?i)\bversion (\d+)\b`).FindAllStringSubmatch(section, -1) {
		n, _ := strconv.Atoi(v[1])
		described[n] = true
	}
	for _, mig := range all {
		if !described[mig.Version] {
			t.Errorf("docs/schema.md, \"The schema and migrations\", does not say what version %d (%04d_%s) creates: add \"version %d ...\" to the paragraph listing the versions",
				mig.Version, mig.Version, mig.Name, mig.Version)
		}
		delete(described, mig.Version)
	}
	words := []string{"no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"}
	for _, c := range regexp.MustCompile(`(?i)\b(\w+) migrations in all\b`).FindAllStringSubmatch(section, -1) {
		if len(all) >= len(words) || !strings.EqualFold(c[1], words[len(all)]) {
			t.Errorf("docs/schema.md, \"The schema and migrations\", says %q; migrations/sql has %d", c[0], len(all))
		}
	}
	for v := range described {
		t.Errorf("docs/schema.md, \"The schema and migrations\", describes version %d, which migrations/sql does not have", v)
	}
}
