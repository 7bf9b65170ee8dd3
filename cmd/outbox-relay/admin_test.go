package main

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
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
	if !strings.Contains(out, "on publish:          mark") {
		t.Fatalf("status does not say published rows are marked:\n%s", out)
	}
	if _, err := conn.Exec(ctx, `INSERT INTO billing.events (topic, value, published_at) VALUES ('t', 'old', now())`); err != nil {
		t.Fatal(err)
	}
	deleteEnv := append(slices.Clone(env), "OUTBOX_ON_PUBLISH=delete")
	if code, out, _ := cli(t, deleteEnv, "status"); code != 0 || !strings.Contains(out, "on publish:          delete") ||
		!strings.Contains(out, "the table shows the backlog and dead letters only") || !strings.Contains(out, "marked published:    1 (left by a relay in mark mode") {
		t.Fatalf("status in delete mode: code %d\n%s", code, out)
	}
	if code, _, errs := cli(t, append(slices.Clone(env), "OUTBOX_ON_PUBLISH=drop"), "status"); code == 0 || !strings.Contains(errs, "OUTBOX_ON_PUBLISH") {
		t.Fatalf("status with OUTBOX_ON_PUBLISH=drop: code %d, %s", code, errs)
	}
	if _, err := conn.Exec(ctx, `DELETE FROM billing.events WHERE value = 'old'`); err != nil {
		t.Fatal(err)
	}
	if code, out, _ := cli(t, env, "dlq", "list"); code != 0 || !strings.Contains(out, "MESSAGE_TOO_LARGE: too big") || !strings.Contains(out, "99") {
		t.Fatalf("dlq list: code %d\n%s", code, out)
	}
	if code, _, errs := cli(t, env, "dlq", "requeue", "abc"); code != 1 || !strings.Contains(errs, `"abc" is not an id`) {
		t.Fatalf("dlq requeue abc: code %d, %s", code, errs)
	}
	if code, out, errs := cli(t, env, "dlq", "requeue", "999"); code != 1 || !strings.Contains(out, "requeued 0 of 1") ||
		!strings.Contains(errs, "no dead letter has id [999]") {
		t.Fatalf("dlq requeue 999 (no such dead letter): code %d, want 1 with the id named\n%s%s", code, out, errs)
	}
	if code, out, errs := cli(t, env, "dlq", "requeue", "--as-new", "999"); code != 1 || !strings.Contains(errs, "no dead letter has id [999]") {
		t.Fatalf("dlq requeue --as-new 999 (no such dead letter): code %d, want 1 with the id named\n%s%s", code, out, errs)
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
	// An OTEL_* setting outbox-relay cannot serve is refused before
	// anything is opened, naming the variable.
	code, out, errs := cli(t, []string{"OUTBOX_DATABASE_URL=postgres://u@127.0.0.1:1/db", "OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OTEL_TRACES_EXPORTER=zipkin"}, "run")
	if code != 1 || out != "" || strings.Count(strings.TrimSpace(errs), "\n") != 0 || !strings.Contains(errs, "OTEL_TRACES_EXPORTER") {
		t.Fatalf("run with OTEL_TRACES_EXPORTER=zipkin: code %d, stdout %q, stderr %q", code, out, errs)
	}
	if code, _, errs := cli(t, nil, "frobnicate"); code != 2 || !strings.Contains(errs, "unknown command") {
		t.Fatalf("unknown command: code %d, %s", code, errs)
	}
}

// TestDLQShowsHeldRowsAndDiscardReleasesThem: status and dlq list show the
// rows a dead letter holds; dlq discard refuses without a reason, then
// releases the key and keeps the row with its reason; a discarded row is not
// requeued in place, only with --as-new; requeue in place keeps the id.
func TestDLQShowsHeldRowsAndDiscardReleasesThem(t *testing.T) {
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// Rows 2 and 5 of key a are dead letters; 3 and 6 of key a are held, 4 of key b is not.
	if _, err := conn.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES ('t', 'a', '1'), ('t', 'a', '2'), ('t', 'a', '3'), ('t', 'b', '4'), ('t', 'c', '5'), ('t', 'c', '6');
WITH moved AS (DELETE FROM outbox WHERE id IN (2, 5) RETURNING id, topic, key, value, created_at)
INSERT INTO outbox_dead_letter (id, topic, key, value, created_at, error) SELECT id, topic, key, value, created_at, 'refused' FROM moved;
UPDATE outbox SET published_at = now() WHERE id = 1`); err != nil {
		t.Fatal(err)
	}
	if code, out, _ := cli(t, env, "status"); code != 0 || !strings.Contains(out, "held rows:           2 rows held on 2 keys") || !strings.Contains(out, "dead letters:        2 (0 discarded)") {
		t.Fatalf("status: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, append(env, "OUTBOX_DEAD_LETTER_ORDER=skip"), "status"); code != 0 || !strings.Contains(out, "held rows:           none (OUTBOX_DEAD_LETTER_ORDER=skip)") {
		t.Fatalf("status under skip: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, env, "dlq", "list"); code != 0 || !strings.Contains(out, "HOLDS") || !regexp.MustCompile(`(?m)^2 .* 1 +- +refused$`).MatchString(out) {
		t.Fatalf("dlq list: code %d\n%s", code, out)
	}
	if code, _, errs := cli(t, env, "dlq", "discard", "2"); code != 1 || !strings.Contains(errs, "--reason is required") {
		t.Fatalf("dlq discard without a reason: code %d, %s", code, errs)
	}
	if code, out, errs := cli(t, env, "dlq", "discard", "2", "--reason", "opened by hand"); code != 0 || !strings.Contains(out, "discarded 1 of 1") {
		t.Fatalf("dlq discard: code %d\n%s%s", code, out, errs)
	}
	if code, out, _ := cli(t, env, "status"); code != 0 || !strings.Contains(out, "held rows:           1 row held on 1 key (") || !strings.Contains(out, "(1 discarded)") {
		t.Fatalf("status after discard: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, env, "dlq", "list"); code != 0 || !strings.Contains(out, `"opened by hand"`) {
		t.Fatalf("dlq list after discard: code %d\n%s", code, out)
	}
	if code, out, errs := cli(t, env, "dlq", "requeue", "2", "5"); code != 1 || !strings.Contains(out, "requeued 1 of 2 dead letters in their original position (ids [5])") ||
		!strings.Contains(errs, "[2] discarded: a discarded dead letter goes back only with --as-new") {
		t.Fatalf("dlq requeue of a discarded and an open dead letter: code %d\n%s", code, out)
	}
	if code, out, _ := cli(t, env, "dlq", "requeue", "--as-new", "2"); code != 0 || !strings.Contains(out, "requeued 1 of 1 dead letters as new outbox rows [7]") {
		t.Fatalf("dlq requeue --as-new: code %d\n%s", code, out)
	}
	var ids []int64
	rows, err := conn.Query(ctx, `SELECT id FROM outbox WHERE published_at IS NULL ORDER BY id`)
	if err == nil {
		ids, err = pgx.CollectRows(rows, pgx.RowTo[int64])
	}
	if err != nil || fmt.Sprint(ids) != "[3 4 5 6 7]" {
		t.Fatalf("unpublished ids %v %v, want [3 4 5 6 7]", ids, err)
	}
	if code, out, _ := cli(t, env, "status"); code != 0 || !strings.Contains(out, "held rows:           none\n") {
		t.Fatalf("status after requeue: code %d\n%s", code, out)
	}
}

// TestMigrateBuildsTheShardIndex: `migrate up` with OUTBOX_SHARDS=4 builds
// the shard index (and finds it in place the second time); once a count is
// recorded, migrate up builds the index for the recorded one, whatever
// OUTBOX_SHARDS says. `migrate sql` prints the index statement only with
// OUTBOX_SHARDS above 1, and its whole output applies with psql (the index
// is built CONCURRENTLY, outside a transaction).
func TestMigrateBuildsTheShardIndex(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SHARDS=4"}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 || !strings.Contains(out, "built the shard index outbox_shards4_idx for 4 shards") {
		t.Fatalf("migrate up with OUTBOX_SHARDS=4: code %d\n%s%s", code, out, errs)
	}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 || !strings.Contains(out, "the shard index outbox_shards4_idx for 4 shards is in place") {
		t.Fatalf("second migrate up: code %d\n%s%s", code, out, errs)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `UPDATE outbox_relay_state SET shards = 2`); err != nil {
		t.Fatal(err)
	}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 || !strings.Contains(out, "split into 2 shards") ||
		!strings.Contains(out, "built the shard index outbox_shards2_idx for 2 shards") {
		t.Fatalf("migrate up with 2 shards recorded: code %d\n%s%s", code, out, errs)
	}
	if code, _, errs := cli(t, []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SHARDS=many"}, "migrate", "up"); code != 1 || !strings.Contains(errs, `OUTBOX_SHARDS is "many"`) {
		t.Fatalf("migrate up with OUTBOX_SHARDS=many: code %d, %s", code, errs)
	}

	if _, out, _ := cli(t, nil, "migrate", "sql"); strings.Contains(out, "CREATE INDEX CONCURRENTLY") {
		t.Fatalf("migrate sql with one shard prints a shard index")
	}
	code, out, _ := cli(t, []string{"OUTBOX_SHARDS=4"}, "migrate", "sql")
	if code != 0 || !strings.Contains(out, `CREATE INDEX CONCURRENTLY IF NOT EXISTS "outbox_shards4_idx"`) {
		t.Fatalf("migrate sql with OUTBOX_SHARDS=4: code %d\n%s", code, out)
	}
	if _, err := exec.LookPath("psql"); err != nil {
		t.Fatalf("psql not found: install postgresql-client")
	}
	fresh := testenv.CreateDatabase(t)
	f := filepath.Join(t.TempDir(), "outbox.sql")
	if err := os.WriteFile(f, []byte(out), 0o600); err != nil {
		t.Fatal(err)
	}
	if res, err := exec.Command("psql", fresh, "-v", "ON_ERROR_STOP=1", "-q", "-f", f).CombinedOutput(); err != nil {
		t.Fatalf("psql -f (migrate sql with OUTBOX_SHARDS=4): %v\n%s", err, res)
	}
	p, err := pgxpool.New(ctx, fresh)
	if err != nil {
		t.Fatal(err)
	}
	defer p.Close()
	if ok, err := outbox.HasShardIndex(ctx, p, outbox.DefaultTable, 4); err != nil || !ok {
		t.Fatalf("after psql -f, no valid shard index (%v)", err)
	}
}

// TestStatusSaysPendingMigrationsAndTheRecordedIdentity: `status` before
// `migrate up` says the migrations are pending and exits non-zero; after it,
// status shows what the first relay recorded (shard count, relay name,
// checkpoint topic, delivery mode) and each shard's owner.
func TestStatusSaysPendingMigrationsAndTheRecordedIdentity(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "status"); code == 0 || !strings.Contains(out, "pending migrations:  8") ||
		!strings.Contains(errs, "8 migrations pending: run `outbox-relay migrate up` first") {
		t.Fatalf("status before migrate up: code %d, want non-zero with the pending migrations named\n%s%s", code, out, errs)
	}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	code, out, errs := cli(t, env, "status")
	if code != 0 || !strings.Contains(out, "shards:              not recorded yet") || !strings.Contains(out, "owners:              none yet") {
		t.Fatalf("status before any relay ran: code %d\n%s%s", code, out, errs)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `UPDATE outbox_relay_state SET shards = 2, relay_name = 'payments-relay', checkpoint_topic = 'payments-checkpoints', delivery = 'exactly-once';
INSERT INTO outbox_owner (shard, token, owner) VALUES (0, 3, 'host-a pid 11'), (1, 1, 'host-b pid 12')`); err != nil {
		t.Fatal(err)
	}
	code, out, errs = cli(t, env, "status")
	for _, want := range []string{
		"shards:              2\n", "relay name:          payments-relay\n", "checkpoint topic:    payments-checkpoints\n",
		"delivery:            exactly-once\n", "owners:              shard 0: host-a pid 11 (lease renewed ", "                     shard 1: host-b pid 12 (lease renewed ",
	} {
		if code != 0 || !strings.Contains(out, want) {
			t.Fatalf("status: code %d, want %q in\n%s%s", code, want, out, errs)
		}
	}
}

// TestDLQRequeueRefusesARowWhoseTopicOrKeyWasChanged: an operator changes a
// dead letter's topic (or key) in the dead-letter table. The dead letter
// never held its new topic and key, whose later rows went out meanwhile;
// requeued in place (its old, lower id) it would reach Kafka after them. So
// `dlq requeue` refuses it, names the published row and --as-new, and exits
// 1; the row stays a dead letter, and --as-new moves it.
func TestDLQRequeueRefusesARowWhoseTopicOrKeyWasChanged(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	// Row 1 (t, a) and row 3 (t, b) are dead letters; rows 2 (t2, a) and 4
	// (t, c) are not held by them and are published; row 5 (t, b) is held.
	if _, err := conn.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES ('t', 'a', '1'), ('t2', 'a', '2'), ('t', 'b', '3'), ('t', 'c', '4'), ('t', 'b', '5');
WITH moved AS (DELETE FROM outbox WHERE id IN (1, 3) RETURNING id, topic, key, value, created_at)
INSERT INTO outbox_dead_letter (id, topic, key, value, created_at, error) SELECT id, topic, key, value, created_at, 'refused' FROM moved;
UPDATE outbox SET published_at = now() WHERE id IN (2, 4);
UPDATE outbox_dead_letter SET topic = 't2' WHERE id = 1;
UPDATE outbox_dead_letter SET key = 'c' WHERE id = 3`); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ id, published string }{{"1", "2"}, {"3", "4"}} {
		code, out, errs := cli(t, env, "dlq", "requeue", tc.id)
		if code != 1 || !strings.Contains(out, "requeued 0 of 1") || !strings.Contains(errs, tc.id+" (row "+tc.published+" of its topic and key is published)") ||
			!strings.Contains(errs, "--as-new") {
			t.Fatalf("dlq requeue %s after its topic or key was changed: code %d, want 1 naming row %s and --as-new\n%s%s", tc.id, code, tc.published, out, errs)
		}
	}
	var dead int
	if err := conn.QueryRow(ctx, `SELECT count(*) FROM outbox_dead_letter`).Scan(&dead); err != nil || dead != 2 {
		t.Fatalf("dead letters after the refusals: %d %v, want 2", dead, err)
	}
	if code, out, errs := cli(t, env, "dlq", "requeue", "--as-new", "1", "3"); code != 0 || !strings.Contains(out, "requeued 2 of 2 dead letters as new outbox rows [6 7]") {
		t.Fatalf("dlq requeue --as-new 1 3: code %d\n%s%s", code, out, errs)
	}
}

// TestDLQListNewestFirstJSONAndTruncated: `dlq list` shows the newest dead
// letters first (`-order oldest` the other way), cuts a long topic and key
// in the table, and `-json` prints every field whole.
func TestDLQListNewestFirstJSONAndTruncated(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	long := "payments." + strings.Repeat("x", 200)
	if _, err := conn.Exec(ctx, `INSERT INTO outbox_dead_letter (id, topic, key, value, headers, created_at, error) VALUES
    (10, 't', 'a', 'v', '{"type":"transfer"}', now(), 'MESSAGE_TOO_LARGE: too big'),
    (20, $1, $2, NULL, NULL, now(), 'topic does not exist')`, long, strings.Repeat("k", 300)); err != nil {
		t.Fatal(err)
	}
	code, out, errs := cli(t, env, "dlq", "list")
	if code != 0 || strings.Index(out, "\n20 ") < 0 || strings.Index(out, "\n20 ") > strings.Index(out, "\n10 ") {
		t.Fatalf("dlq list: code %d, want 20 listed before 10\n%s%s", code, out, errs)
	}
	if strings.Contains(out, long) || !strings.Contains(out, long[:37]+"...") || strings.Contains(out, strings.Repeat("k", 100)) {
		t.Fatalf("dlq list prints the long topic or key whole:\n%s", out)
	}
	if code, out, _ := cli(t, env, "dlq", "list", "-order", "oldest"); code != 0 || strings.Index(out, "\n10 ") > strings.Index(out, "\n20 ") {
		t.Fatalf("dlq list -order oldest: code %d, want 10 listed before 20\n%s", code, out)
	}
	if code, _, errs := cli(t, env, "dlq", "list", "-order", "random"); code != 1 || !strings.Contains(errs, "use newest or oldest") {
		t.Fatalf("dlq list -order random: code %d, %s", code, errs)
	}
	code, out, errs = cli(t, env, "dlq", "list", "-json")
	var got []struct {
		ID         int64           `json:"id"`
		Topic      string          `json:"topic"`
		Key        *string         `json:"key"`
		ValueBytes *int            `json:"value_bytes"`
		Headers    json.RawMessage `json:"headers"`
		Error      string          `json:"error"`
		Holds      *int64          `json:"holds"`
	}
	if code != 0 {
		t.Fatalf("dlq list -json: code %d\n%s%s", code, out, errs)
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("dlq list -json is not a JSON array: %v\n%s", err, out)
	}
	if len(got) != 2 || got[0].ID != 20 || got[0].Topic != long || got[0].Key == nil || len(*got[0].Key) != 300 || got[0].ValueBytes != nil ||
		got[1].ID != 10 || got[1].ValueBytes == nil || *got[1].ValueBytes != 1 || strings.Join(strings.Fields(string(got[1].Headers)), "") != `{"type":"transfer"}` ||
		got[1].Error != "MESSAGE_TOO_LARGE: too big" || got[1].Holds == nil {
		t.Fatalf("dlq list -json:\n%s", out)
	}
}

func TestStatusShowsTheNamedStandbys(t *testing.T) {
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	code, out, errs := cli(t, append(env, "OUTBOX_STANDBY_NAMES=stb-gone"), "status")
	if code != 0 || !strings.Contains(out, "standby stb-gone:    NOT CONNECTED: publishing is held") {
		t.Fatalf("status with a named standby that is not connected: code %d\n%s%s", code, out, errs)
	}
	code, out, errs = cli(t, env, "status")
	if code != 0 || !strings.Contains(out, "standbys:            none named (OUTBOX_STANDBY_NAMES unset)") {
		t.Fatalf("status without OUTBOX_STANDBY_NAMES: code %d\n%s%s", code, out, errs)
	}
}

func TestMigrateUpCreatesThePublicationOfTheReplicationSource(t *testing.T) {
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SOURCE=replication"}
	code, out, errs := cli(t, env, "migrate", "up")
	if code != 0 || !strings.Contains(out, "publication public_outbox_relay publishes the inserts of public.outbox") {
		t.Fatalf("migrate up with OUTBOX_SOURCE=replication: code %d\n%s%s", code, out, errs)
	}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up again: code %d\n%s%s", code, out, errs)
	}
}

// TestStatusShowsStoppedShards: a shard an instance stopped until an
// operator acts (recorded in <table>_owner, as the relay records it) is shown
// by `status` from any host, with who stopped it and why, and status exits
// non-zero; with none stopped it says so and exits 0.
func TestStatusShowsStoppedShards(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	conn, err := pgx.Connect(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	if _, err := conn.Exec(ctx, `INSERT INTO outbox_owner (shard, token, owner) VALUES (0, 3, 'host-a pid 11'), (1, 1, 'host-b pid 12')`); err != nil {
		t.Fatal(err)
	}
	code, out, errs := cli(t, env, "status")
	if code != 0 || !strings.Contains(out, "stopped shards:      none\n") {
		t.Fatalf("status with no shard stopped: code %d, want 0 and \"stopped shards: none\"\n%s%s", code, out, errs)
	}
	reason := "recover shard 1: checkpoint partition holds a record that is not a checkpoint: the newest committed record of cp partition 1, at offset 7, is a tombstone"
	if _, err := conn.Exec(ctx, `UPDATE outbox_owner SET stopped_at = now() - interval '90 seconds', stopped_reason = $1 WHERE shard = 1`, reason); err != nil {
		t.Fatal(err)
	}
	code, out, errs = cli(t, env, "status")
	// The age is the database clock's, read a moment later on a loaded
	// machine: 1m30s and up.
	want := regexp.MustCompile(`stopped shards: {6}shard 1: STOPPED 1m3\ds ago by host-b pid 12: ` + regexp.QuoteMeta(reason) + "\n")
	if code == 0 || !want.MatchString(out) || !strings.Contains(errs, "1 shard of public.outbox stopped until an operator acts") {
		t.Fatalf("status with shard 1 stopped: code %d, want non-zero and %q\n%s%s", code, want, out, errs)
	}
	if !strings.Contains(out, "unpublished rows:") {
		t.Errorf("status stopped printing at the stopped shards: want every section\n%s", out)
	}
}
