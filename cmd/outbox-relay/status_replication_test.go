package main

import (
	"context"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestStatusShowsTheSlotAndTheCheckpointPosition: `outbox-relay status` with
// OUTBOX_SOURCE=replication names the slot, its active walsender's pid, its
// lag in bytes, its confirmed flush position and restart_lsn, and the LSN
// of the latest committed checkpoint; before the first start it says the
// slot is created then, and once the relay stopped that no walsender holds
// it.
func TestStatusShowsTheSlotAndTheCheckpointPosition(t *testing.T) {
	pg := testenv.StartPrivatePostgres(t, "wal_level=logical", "max_replication_slots=8", "max_wal_senders=8")
	url := pg.URL("postgres", "postgres")
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfgKafka := testenv.RelayConfig(&testenv.DB{URL: url, Table: outbox.DefaultTable}, k)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SOURCE=replication", "OUTBOX_DEAD_LETTER_ORDER=skip",
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(k.Brokers, ","), "OUTBOX_RELAY_NAME=" + cfgKafka.RelayName,
		"OUTBOX_CHECKPOINT_TOPIC=" + cfgKafka.CheckpointTopic}
	if code, out, errs := cli(t, env, "migrate", "up"); code != 0 {
		t.Fatalf("migrate up: code %d\n%s%s", code, out, errs)
	}
	code, out, errs := cli(t, env, "status")
	if code != 0 || !strings.Contains(out, "replication slot:    postgres_public_outbox_relay does not exist") ||
		!strings.Contains(out, "next start:          creates the slot and hands over from the poll read") {
		t.Fatalf("status before the first start: code %d\n%s%s", code, out, errs)
	}

	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	db := &testenv.DB{URL: url, Pool: pool, Table: outbox.DefaultTable}
	cfg := testenv.RelayConfig(db, k)
	cfg.RelayName, cfg.CheckpointTopic = cfgKafka.RelayName, cfgKafka.CheckpointTopic
	cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
	c := k.NewConsumer(t, topic)
	want := db.Insert(t, topic, 10, []string{"a", "b"})
	r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	want = append(want, db.Insert(t, topic, 10, []string{"a", "b"})...)
	c.WaitFor(t, len(want), 60*time.Second)

	lookup := func(out, label string) string {
		m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(label+":") + `\s+(.*)$`).FindStringSubmatch(out)
		if m == nil {
			return ""
		}
		return m[1]
	}
	field := func(out, label string) string {
		v := lookup(out, label)
		if v == "" {
			t.Fatalf("status has no %q line:\n%s", label, out)
		}
		return v
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		code, out, errs = cli(t, env, "status")
		if code != 0 {
			t.Fatalf("status while the relay runs: code %d\n%s%s", code, out, errs)
		}
		// The relay's walsender holds the slot, and the slot is
		// confirmed to the checkpoint that holds the 20 rows.
		if strings.Contains(lookup(out, "replication slot"), "active pid") && strings.HasPrefix(lookup(out, "confirm behind"), "0 bytes") {
			break
		}
		if lookup(out, "confirm behind") == "" {
			// Rows read from the slot (not the hand-over's), so that
			// the latest checkpoint is the replication source's.
			want = append(want, db.Insert(t, topic, 1, []string{"a"})...)
		}
		if time.Now().After(deadline) {
			t.Fatalf("status never showed the slot held and confirmed to the checkpoint:\n%s", out)
		}
		time.Sleep(500 * time.Millisecond)
	}
	for _, label := range []string{"source", "slot lag", "confirmed flush", "restart lsn", "checkpoint lsn", "checkpoint history"} {
		t.Logf("%s: %s", label, field(out, label))
	}
	if !regexp.MustCompile(`^postgres_public_outbox_relay, active pid [1-9][0-9]*$`).MatchString(field(out, "replication slot")) {
		t.Errorf("replication slot line: %q", field(out, "replication slot"))
	}
	lag, err := strconv.ParseInt(strings.Fields(field(out, "slot lag"))[0], 10, 64)
	if err != nil || lag < 0 {
		t.Errorf("slot lag line: %q", field(out, "slot lag"))
	}
	confirmed := field(out, "confirmed flush")
	if cp := strings.Fields(field(out, "checkpoint lsn"))[0]; cp != confirmed {
		t.Errorf("the checkpoint's lsn %s is not the confirmed flush position %s", cp, confirmed)
	}
	if !regexp.MustCompile(`^[0-9A-F]+/[0-9A-F]+ \(wal_status reserved\)$`).MatchString(field(out, "restart lsn")) {
		t.Errorf("restart lsn line: %q", field(out, "restart lsn"))
	}

	c.WaitFor(t, len(want), 60*time.Second)
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	code, out, errs = cli(t, env, "status")
	if code != 0 || !strings.Contains(field(out, "replication slot"), "not active (no relay reads it") {
		t.Fatalf("status after the relay stopped: code %d\n%s%s", code, out, errs)
	}
	// verify in this mode: clean, and it says what it proves.
	code, out, errs = cli(t, env, "verify", "-since", "1h")
	if code != 0 || !strings.Contains(out, "OUTBOX_SOURCE=replication: rows are not marked in this mode, so verify proves that no row is in Kafka twice") {
		t.Fatalf("verify with OUTBOX_SOURCE=replication: code %d\n%s%s", code, out, errs)
	}
	t.Logf("verify:\n%s", out)
	code, out, _ = cli(t, []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_SOURCE=replication"}, "status")
	if code != 0 || !strings.Contains(out, "checkpoint lsn:      not read: set OUTBOX_KAFKA_BROKERS") {
		t.Fatalf("status without OUTBOX_KAFKA_BROKERS: code %d\n%s", code, out)
	}
}
