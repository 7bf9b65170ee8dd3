package main

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kfake"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
)

// demoDatabaseURL is the server the demo tests use, as the demo finds it.
func demoDatabaseURL() string {
	if u := os.Getenv("OUTBOX_DATABASE_URL"); u != "" {
		return u
	}
	return defaultDemoDatabaseURL
}

// runDemoForTest runs the demo in a schema of its own (dropped after the
// test) and returns its output. It fails the test, never skips it, when
// PostgreSQL is unreachable.
func runDemoForTest(t *testing.T, args ...string) (string, error) {
	t.Helper()
	schema := testenv.RandomName(defaultDemoSchema + "_test_")
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if conn, err := pgx.Connect(ctx, demoDatabaseURL()); err == nil {
			_, _ = conn.Exec(ctx, "DROP SCHEMA IF EXISTS "+migrations.QuoteIdent(schema)+" CASCADE")
			conn.Close(ctx)
		}
	})
	logFile := filepath.Join(t.TempDir(), "relay.log")
	args = append(args, "-schema", schema, "-log", logFile)
	ctx, cancel := context.WithTimeout(t.Context(), 90*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("demo output:\n%s\nstderr:\n%s", stdout.String(), stderr.String())
			if b, err := os.ReadFile(logFile); err == nil {
				t.Logf("relay log:\n%s", b)
			}
		}
	})
	err := runDemo(ctx, args, os.Environ(), &stdout, &stderr)
	return stdout.String(), err
}

func requirePass(t *testing.T, out string, err error, events int) {
	t.Helper()
	if err != nil {
		t.Fatalf("demo: %v", err)
	}
	want := "PASS: " + strconv.Itoa(events) + " transfers reached Kafka exactly once, in order per account"
	if !strings.Contains(out, want) {
		t.Fatalf("the demo's output lacks %q", want)
	}
	for _, line := range []string{"duplicates=0 ", "missing=0 ", "out_of_order=0 ", "unexpected=0 ",
		"written=" + strconv.Itoa(events) + " ", "verified=" + strconv.Itoa(events) + " ", "published=" + strconv.Itoa(events) + " ",
		"ledger_applied=" + strconv.Itoa(events) + " ", "ledger_balances=equal "} {
		if !strings.Contains(out, line) {
			t.Errorf("the demo's summary lacks %q", line)
		}
	}
}

func TestDemoDeliversEveryTransferExactlyOnce(t *testing.T) {
	t.Parallel()
	out, err := runDemoForTest(t, "-events", "300", "-rate", "0")
	requirePass(t, out, err, 300)
	if !strings.Contains(out, "kcat -C -b 127.0.0.1:") || !strings.Contains(out, "-X isolation.level=read_committed") {
		t.Errorf("the demo does not print the kcat command line")
	}
}

// With -chaos the relay and the ledger's consumer are killed again and
// again; the events still reach Kafka once each and the ledger applies
// each once.
func TestDemoRelayCrashesCauseNoDuplicates(t *testing.T) {
	t.Parallel()
	out, err := runDemoForTest(t, "-events", "800", "-rate", "0", "-chaos", "-chaos-every", "300ms")
	requirePass(t, out, err, 800)
	for _, what := range []string{"relay", "ledger"} {
		m := regexp.MustCompile(what + `_crashes=(\d+)`).FindStringSubmatch(out)
		if m == nil {
			t.Fatalf("the summary lacks %s_crashes", what)
		}
		if n, _ := strconv.Atoi(m[1]); n < 1 {
			t.Errorf("%s_crashes=%d: the chaos mode never crashed the %s", what, n, what)
		}
	}
}

// An external cluster keeps the events of earlier runs in the payments
// topic; the checker must start after them.
func TestDemoOnExternalClusterIgnoresEarlierRuns(t *testing.T) {
	t.Parallel()
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	brokers := strings.Join(c.ListenAddrs(), ",")
	for run := range 2 {
		out, err := runDemoForTest(t, "-events", "150", "-rate", "0", "-kafka", brokers)
		if err != nil || !strings.Contains(out, "external cluster") {
			t.Errorf("run %d: external cluster not used", run)
		}
		requirePass(t, out, err, 150)
	}
}

func TestDemoRefusesToDropForeignSchema(t *testing.T) {
	var stdout, stderr bytes.Buffer
	err := runDemo(t.Context(), []string{"-schema", "public"}, nil, &stdout, &stderr)
	if err == nil || !strings.Contains(err.Error(), `must start with "outbox_demo"`) {
		t.Fatalf("runDemo -schema public: got %v, want a refusal", err)
	}
}
