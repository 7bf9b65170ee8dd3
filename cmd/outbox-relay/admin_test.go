package main

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// cli runs the binary's entry point in-process and returns its exit code,
// stdout and stderr.
func cli(t *testing.T, env []string, args ...string) (int, string, string) {
	t.Helper()
	var out, errb bytes.Buffer
	code := run(args, env, &out, &errb)
	return code, out.String(), errb.String()
}

// TestAdminCommands walks an operator's session: migrate status (pending),
// migrate up, up again (nothing to do), status, a dead letter listed and
// requeued, and migrate sql for other names.
func TestAdminCommands(t *testing.T) {
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SCHEMA=billing", "OUTBOX_TABLE=events"}

	if code, out, errs := cli(t, env, "migrate", "status"); code != 0 || !strings.Contains(out, "pending") {
		t.Fatalf("migrate status before up: code %d\n%s%s", code, out, errs)
	}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 || !strings.Contains(out, "applied 0001_create_outbox to billing.events") {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	if code, out, _ := cli(t, env, "migrate", "up"); code != 0 || !strings.Contains(out, "up to date") {
		t.Fatalf("second migrate up: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, env, "migrate", "status"); code != 0 || strings.Contains(out, "pending") {
		t.Fatalf("migrate status after up: code %d\n%s", code, out)
	}

	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `INSERT INTO billing.events (topic, value) VALUES ('t', 'a'), ('t', 'b');
INSERT INTO billing.events_dead_letter (id, topic, value, created_at, error) VALUES (99, 't', 'x', now(), 'MESSAGE_TOO_LARGE: too big')`); err != nil {
		t.Fatal(err)
	}
	code, out, _ := cli(t, env, "status")
	if code != 0 || !strings.Contains(out, "unpublished rows:    2") || !strings.Contains(out, "dead letters:        1") {
		t.Fatalf("status: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, env, "dlq", "list"); code != 0 || !strings.Contains(out, "MESSAGE_TOO_LARGE: too big") || !strings.Contains(out, "99") {
		t.Fatalf("dlq list: code %d\n%s", code, out)
	}
	if code, _, errs := cli(t, env, "dlq", "requeue", "abc"); code != 1 || !strings.Contains(errs, `"abc" is not an id`) {
		t.Fatalf("dlq requeue abc: code %d, %s", code, errs)
	}
	if code, out, _ := cli(t, env, "dlq", "requeue", "99"); code != 0 || !strings.Contains(out, "requeued 1 of 1") {
		t.Fatalf("dlq requeue 99: code %d\n%s", code, out)
	}
	var n int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM billing.events WHERE value = 'x' AND published_at IS NULL`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("requeued row in the outbox: %d, %v", n, err)
	}

	if code, out, _ := cli(t, nil, "migrate", "sql"); code != 0 || !strings.Contains(out, `CREATE TABLE "public"."outbox"`) {
		t.Fatalf("migrate sql: code %d\n%.300s", code, out)
	}
	if code, out, _ := cli(t, []string{"OUTBOX_SCHEMA=billing", "OUTBOX_TABLE=events"}, "migrate", "sql"); code != 0 ||
		!strings.Contains(out, `CREATE TABLE "billing"."events"`) || strings.Contains(out, `"outbox"`) {
		t.Fatalf("migrate sql for billing.events: code %d\n%.300s", code, out)
	}
}

// TestRunRefusesBadConfigurationInOneLine: `outbox-relay run` with missing
// or contradicting settings exits 1 with one line naming the variables, and
// never prints the password.
func TestRunRefusesBadConfigurationInOneLine(t *testing.T) {
	for _, env := range [][]string{
		nil,
		{"OUTBOX_DATABASE_URL=postgres://u:hunter2@127.0.0.1:1/db", "OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OUTBOX_KAFKA_ACKS=1"},
	} {
		code, out, errs := cli(t, env, "run")
		if code != 1 || out != "" || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, "OUTBOX_") {
			t.Fatalf("run with %v: code %d, stdout %q, stderr %q", env, code, out, errs)
		}
		if strings.Contains(errs, "hunter2") {
			t.Fatalf("the password was printed: %s", errs)
		}
	}
	if code, _, errs := cli(t, nil, "frobnicate"); code != 2 || !strings.Contains(errs, "unknown command") {
		t.Fatalf("unknown command: code %d, %s", code, errs)
	}
}
