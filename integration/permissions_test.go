package integration

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// The first lines of the README's two grant blocks.
const (
	adminGrantsMarker = "-- outbox-relay grants: admin role"
	relayGrantsMarker = "-- outbox-relay grants: relay role"
)

// readmeSQLBlock returns the one ```sql block of README.md whose first line
// starts with marker, failing the test unless there is exactly one.
func readmeSQLBlock(t *testing.T, marker string) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	readme, err := os.ReadFile(filepath.Join(filepath.Dir(strings.TrimSpace(string(out))), "docs", "operations.md"))
	if err != nil {
		t.Fatal(err)
	}
	var found []string
	for _, m := range regexp.MustCompile("(?ms)^```sql\n(.*?)^```").FindAllStringSubmatch(string(readme), -1) {
		if strings.HasPrefix(m[1], marker) {
			found = append(found, m[1])
		}
	}
	if len(found) != 1 {
		t.Fatalf("docs/operations.md has %d ```sql blocks starting with %q, want exactly 1", len(found), marker)
	}
	return found[0]
}

// forRoles rewrites a README grant block for this test's database and
// roles: the README's database app and roles outbox_admin and outbox_relay
// (as whole words, so that the table outbox_relay_state stays a table)
// become the test's.
func forRoles(block, database, admin, relay string) string {
	block = regexp.MustCompile(`\boutbox_admin\b`).ReplaceAllString(block, admin)
	block = regexp.MustCompile(`\boutbox_relay\b`).ReplaceAllString(block, relay)
	return regexp.MustCompile(`(?i)\b(ON\s+DATABASE\s+)app\b`).ReplaceAllString(block, "${1}"+database)
}

// grantsFor returns the README block of marker for the test's database and
// roles, failing the test unless it grants to role.
func grantsFor(t *testing.T, marker, database, admin, relay, role string) string {
	t.Helper()
	sql := forRoles(readmeSQLBlock(t, marker), database, admin, relay)
	if !strings.Contains(sql, role) {
		t.Fatalf("the README block %q grants nothing to its role (outbox_admin or outbox_relay):\n%s", marker, sql)
	}
	return sql
}

// createRole creates a login role with a password and returns the URL of
// dbURL's database as that role; the role and what it owns or was granted
// in that database are dropped with the test.
func createRole(t *testing.T, dbURL, name string) string {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	password := testenv.RandomName("pw")
	if _, err := conn.Exec(ctx, fmt.Sprintf("CREATE ROLE %s LOGIN PASSWORD '%s'", name, password)); err != nil {
		t.Fatalf("create role %s: %v", name, err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, dbURL)
		if err != nil {
			t.Logf("drop role %s: %v", name, err)
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1", name)
		if _, err := c.Exec(ctx, "DROP OWNED BY "+name+" CASCADE; DROP ROLE "+name); err != nil {
			t.Logf("drop role %s: %v", name, err)
		}
	})
	u, err := url.Parse(dbURL)
	if err != nil {
		t.Fatal(err)
	}
	u.User = url.UserPassword(name, password)
	return u.String()
}

// execSQL runs sql on dbURL (as the test's superuser).
func execSQL(t *testing.T, dbURL, sql string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, sql); err != nil {
		t.Fatalf("%v\n%s", err, sql)
	}
}

// cliAs runs the built binary with env and args, and returns its exit code
// and output.
func cliAs(t *testing.T, bin string, env []string, args ...string) (int, string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	code := 0
	if err != nil {
		ee, ok := err.(*exec.ExitError)
		if !ok {
			t.Fatalf("%s %v: %v", bin, args, err)
		}
		code = ee.ExitCode()
	}
	return code, string(out)
}

// baseEnv is the test's environment without any OUTBOX_* variable.
func baseEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			env = append(env, kv)
		}
	}
	return env
}

// TestREADMEGrantsAreExactlyEnough runs the README's two grant blocks, as
// they are written there, for fresh roles, and the built binary with them:
// the admin role migrates a fresh database, requeues a dead letter and
// reshards; the relay role runs the relay (exactly-once: a row reaches
// Kafka exactly once and an invalid one is dead-lettered; then at-most-once,
// with retention deleting published rows), `status` and `dlq list`, and is
// refused `dlq requeue`. A grant missing from the README fails it with
// PostgreSQL's "permission denied".
func TestREADMEGrantsAreExactlyEnough(t *testing.T) {
	bin := buildRelayBinary(t)

	superURL := testenv.CreateDatabase(t)
	u, err := url.Parse(superURL)
	if err != nil {
		t.Fatal(err)
	}
	database := strings.TrimPrefix(u.Path, "/")
	admin, relayRole := testenv.RandomName("outbox_admin_"), testenv.RandomName("outbox_relay_")
	adminURL := createRole(t, superURL, admin)
	relayURL := createRole(t, superURL, relayRole)

	// The admin role migrates the fresh database.
	execSQL(t, superURL, grantsFor(t, adminGrantsMarker, database, admin, relayRole, admin))
	adminEnv := append(baseEnv(), "OUTBOX_DATABASE_URL="+adminURL)
	if code, out := cliAs(t, bin, adminEnv, "migrate", "up"); code != 0 || !strings.Contains(out, "applied 0001_") {
		t.Fatalf("migrate up as the admin role (README grants): exit %d\n%s", code, out)
	}
	execSQL(t, superURL, grantsFor(t, relayGrantsMarker, database, admin, relayRole, relayRole))

	// The relay role relays: one good row exactly once, one invalid row
	// dead-lettered.
	k := testenv.NewKafka(t, 1, "payments")
	consumer := k.NewConsumer(t, "payments")
	pool, err := pgxpool.New(context.Background(), superURL)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	db := &testenv.DB{URL: superURL, Pool: pool, Table: outbox.DefaultTable}
	good := db.Insert(t, "payments", 1, []string{"acct-1"})
	var poison int64
	if err := pool.QueryRow(context.Background(), `INSERT INTO outbox (topic, value) VALUES ('not a topic!', 'x') RETURNING id`).Scan(&poison); err != nil {
		t.Fatal(err)
	}
	settings := []string{
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(k.Brokers, ","),
		"OUTBOX_RELAY_NAME=" + testenv.RandomName("relay-"),
		"OUTBOX_CHECKPOINT_TOPIC=" + testenv.RandomName("checkpoints-"),
		"OUTBOX_POLL_INTERVAL=100ms",
		"OUTBOX_REBALANCE_INTERVAL=100ms",
		"OUTBOX_METRICS_ADDR=127.0.0.1:0",
		"OUTBOX_SHUTDOWN_TIMEOUT=10s",
		"OUTBOX_LOG_LEVEL=info",
	}
	relayEnv := append(append(baseEnv(), "OUTBOX_DATABASE_URL="+relayURL), settings...)
	logs := newRelayLogs(t, "permissions")
	p := startRelayProcess(t, bin, relayEnv, logs)
	// waitUntil fails at once, with the relay's output, if it exits.
	waitUntil(t, 30*time.Second, p, "the row marked published and the poison row dead-lettered", func() bool {
		var marked, dead int
		_ = pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM outbox WHERE published_at IS NOT NULL),
  (SELECT count(*) FROM outbox_dead_letter WHERE id = $1)`, poison).Scan(&marked, &dead)
		return marked == 1 && dead == 1
	})
	testenv.CheckExactlyOnce(t, good, consumer.WaitFor(t, len(good), 30*time.Second))
	stopRelay(t, p)

	// at-most-once (the in-flight table), with a retention that deletes the
	// row published above at start.
	more := db.Insert(t, "payments", 1, []string{"acct-2"})
	// The delivery mode is recorded for the table: the admin role changes it.
	modeEnv := append(append(append([]string{}, adminEnv...), settings...), "OUTBOX_DELIVERY=at-most-once")
	if code, out := cliAs(t, bin, modeEnv, "reshard"); code != 0 || !strings.Contains(out, "delivery from exactly-once to at-most-once") {
		t.Fatalf("reshard to at-most-once as the admin role: exit %d\n%s", code, out)
	}
	amo := append(append([]string{}, relayEnv...), "OUTBOX_DELIVERY=at-most-once", "OUTBOX_RETENTION=1ms")
	p = startRelayProcess(t, bin, amo, logs)
	waitUntil(t, 30*time.Second, p, "the at-most-once row marked and retention deleting the first", func() bool {
		var marked, left int
		_ = pool.QueryRow(context.Background(), `SELECT (SELECT count(*) FROM outbox WHERE id = $1 AND published_at IS NOT NULL),
  (SELECT count(*) FROM outbox WHERE id = $2)`, more[0], good[0]).Scan(&marked, &left)
		return marked == 1 && left == 0
	})
	seen := consumer.WaitFor(t, len(good)+len(more), 30*time.Second)
	testenv.CheckExactlyOnce(t, append(append([]int64{}, good...), more...), seen)
	stopRelay(t, p)

	relayCLI := append(baseEnv(), "OUTBOX_DATABASE_URL="+relayURL)
	if code, out := cliAs(t, bin, relayCLI, "status"); code != 0 || !strings.Contains(out, "dead letters:        1") {
		t.Fatalf("status as the relay role: exit %d\n%s", code, out)
	}
	if code, out := cliAs(t, bin, relayCLI, "dlq", "list"); code != 0 || !strings.Contains(out, "not a topic!") {
		t.Fatalf("dlq list as the relay role: exit %d\n%s", code, out)
	}
	// The relay role may not requeue: that is the admin's, and the grants
	// above are no wider than the relay needs.
	if code, out := cliAs(t, bin, relayCLI, "dlq", "requeue", fmt.Sprint(poison)); code == 0 || !strings.Contains(out, "permission denied") {
		t.Fatalf("dlq requeue as the relay role: exit %d, want permission denied\n%s", code, out)
	}

	// Nor discard: giving a dead letter up is the admin's too.
	if code, out := cliAs(t, bin, relayCLI, "dlq", "discard", fmt.Sprint(poison), "--reason", "test"); code == 0 || !strings.Contains(out, "permission denied") {
		t.Fatalf("dlq discard as the relay role: exit %d, want permission denied\n%s", code, out)
	}

	// The admin role requeues the dead letter and reshards, every relay stopped.
	if code, out := cliAs(t, bin, adminEnv, "dlq", "requeue", fmt.Sprint(poison)); code != 0 || !strings.Contains(out, "requeued 1 of 1") {
		t.Fatalf("dlq requeue as the admin role: exit %d\n%s", code, out)
	}
	reshardEnv := append(append(append([]string{}, adminEnv...), settings...), "OUTBOX_SHARDS=2")
	if code, out := cliAs(t, bin, reshardEnv, "reshard"); code != 0 || !strings.Contains(out, "from 1 to 2 shards") {
		t.Fatalf("reshard as the admin role: exit %d\n%s", code, out)
	}

}

// stopRelay sends SIGTERM and expects a clean exit.
func stopRelay(t *testing.T, p *relayProcess) {
	t.Helper()
	p.signal(t, syscall.SIGTERM)
	if st := p.wait(t, 30*time.Second); st.ExitCode() != 0 {
		t.Fatalf("the relay exited with %v\n%s", st, p.log.text())
	}
	if strings.Contains(p.log.text(), "permission denied") {
		t.Fatalf("the relay was denied a permission:\n%s", p.log.text())
	}
}
