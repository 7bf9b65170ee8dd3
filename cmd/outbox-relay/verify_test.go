package main

import (
	"context"
	"encoding/json"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/verify"
)

// verifyJSON runs `outbox-relay verify -json` with env and args and decodes
// the report.
func verifyJSON(t *testing.T, env []string, args ...string) (int, verify.Report, string) {
	t.Helper()
	code, out, errs := cli(t, env, append([]string{"verify", "-json"}, args...)...)
	var rep verify.Report
	if err := json.Unmarshal([]byte(out), &rep); err != nil {
		t.Fatalf("verify -json printed no report (exit %d): %v\n%s\nstderr: %s", code, err, out, errs)
	}
	return code, rep, errs
}

// TestVerifyIsCleanAfterTheDemo: the demo's transfers, relayed exactly
// once, verify clean (exit 0), every row accounted for.
func TestVerifyIsCleanAfterTheDemo(t *testing.T) {
	c, err := kfake.NewCluster(kfake.NumBrokers(1))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	brokers := strings.Join(c.ListenAddrs(), ",")
	out, err := runDemoForTest(t, "-events", "300", "-rate", "0", "-kafka", brokers)
	requirePass(t, out, err, 300)
	schema := demoSchemaOf(t, out)
	env := []string{"OUTBOX_DATABASE_URL=" + demoDatabaseURL(), "OUTBOX_KAFKA_BROKERS=" + brokers, "OUTBOX_SCHEMA=" + schema}
	code, rep, errs := verifyJSON(t, env, "-since", "1h")
	if code != 0 || !rep.Clean() || rep.Published != 300 || rep.Records != 300 {
		t.Fatalf("verify after the demo: exit %d, published %d, records %d, counts %v, findings %v\nstderr: %s", code, rep.Published, rep.Records, rep.Counts, rep.Findings, errs)
	}
	code, text, _ := cli(t, env, "verify", "-since", "1h")
	if code != 0 || !strings.Contains(text, "CLEAN rows=300 published=300") {
		t.Fatalf("verify's summary line (exit %d): %s", code, text)
	}
}

// demoSchemaOf finds the schema runDemoForTest gave the demo.
func demoSchemaOf(t *testing.T, out string) string {
	t.Helper()
	i := strings.Index(out, defaultDemoSchema+"_test_")
	if i < 0 {
		t.Fatalf("the demo's output does not name its schema:\n%s", out)
	}
	end := i + len(defaultDemoSchema+"_test_") + 8
	return out[i:end]
}

// TestVerifyFindsAndNamesEveryInjectedFault: after a clean run, four faults
// are injected, each of a kind verify must name with its id: a row marked
// published by hand that Kafka never got, a second record with an existing
// outbox-id, a row whose value changed after it was published, and a record
// whose outbox-id matches no row. Exit 1; and 2 when Kafka is unreachable.
func TestVerifyFindsAndNamesEveryInjectedFault(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 50, []string{"a", "b", "c", "d"})
	cfg := testenv.RelayConfig(db, k)
	run := testenv.StartRelay(t, db, cfg)
	deadline := time.Now().Add(30 * time.Second)
	for db.Unpublished(t) > 0 && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	env := []string{"OUTBOX_DATABASE_URL=" + db.URL, "OUTBOX_KAFKA_BROKERS=" + strings.Join(k.Brokers, ","), "OUTBOX_CHECKPOINT_TOPIC=" + cfg.CheckpointTopic}
	if code, rep, errs := verifyJSON(t, env); code != 0 || !rep.Clean() || rep.Published != 50 {
		t.Fatalf("verify before the faults: exit %d, counts %v, findings %v\n%s", code, rep.Counts, rep.Findings, errs)
	}

	// 1. marked published by hand, never sent.
	missing := db.Insert(t, topic, 1, []string{"a"})[0]
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET published_at = now() WHERE id = $1`, missing); err != nil {
		t.Fatal(err)
	}
	// 2. a second record with the outbox-id of row ids[4], as the relay
	// would send it (same key, value, partition, event id).
	var key, value []byte
	var event string
	if err := db.Pool.QueryRow(ctx, `SELECT key, value, event_id::text FROM outbox WHERE id = $1`, ids[4]).Scan(&key, &value, &event); err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	header := func(id int64) []kgo.RecordHeader {
		return []kgo.RecordHeader{{Key: "outbox-id", Value: []byte(strconv.FormatInt(id, 10))}}
	}
	phantom := missing + 1000
	for _, r := range []*kgo.Record{
		{Key: key, Value: value, Headers: append(header(ids[4]), kgo.RecordHeader{Key: "outbox-event-id", Value: []byte(event)})},
		// 4. a record of no row.
		{Key: []byte("z"), Value: []byte("forged"), Headers: header(phantom)},
	} {
		if err := cl.ProduceSync(ctx, r).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	// 3. the row's value changed after it was published.
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET value = 'changed' WHERE id = $1`, ids[7]); err != nil {
		t.Fatal(err)
	}

	code, rep, errs := verifyJSON(t, env)
	if code != 1 {
		t.Fatalf("verify with faults: exit %d, want 1\n%s", code, errs)
	}
	want := map[string]int64{verify.Missing: missing, verify.Duplicate: ids[4], verify.Differ: ids[7], verify.Phantom: phantom}
	for kind, id := range want {
		if rep.Counts[kind] != 1 {
			t.Errorf("%s: counted %d, want 1 (counts %v)", kind, rep.Counts[kind], rep.Counts)
		}
		found := false
		for _, f := range rep.Findings {
			found = found || f.Kind == kind && f.ID == id
		}
		if !found {
			t.Errorf("no %s finding names id %d: %v", kind, id, rep.Findings)
		}
	}
	for kind, n := range rep.Counts {
		if _, ok := want[kind]; !ok && n != 0 {
			t.Errorf("%s: counted %d, want 0 (findings %v)", kind, n, rep.Findings)
		}
	}
	code, text, _ := cli(t, env, "verify")
	if code != 1 || !strings.Contains(text, "DISCREPANCIES") || !strings.Contains(text, "missing id="+strconv.FormatInt(missing, 10)) {
		t.Fatalf("verify's text report (exit %d):\n%s", code, text)
	}

	down := []string{"OUTBOX_DATABASE_URL=" + db.URL, "OUTBOX_KAFKA_BROKERS=127.0.0.1:1"}
	if code, _, errs := cli(t, down, "verify"); code != 2 || !strings.Contains(errs, "could not check") ||
		!strings.Contains(errs, "OUTBOX_KAFKA_BROKERS=127.0.0.1:1") {
		t.Fatalf("verify with Kafka unreachable: exit %d, want 2 and a reason naming the brokers and OUTBOX_KAFKA_BROKERS\n%s", code, errs)
	}
}

// TestVerifyErrorsSayWhatToDo: an unmigrated table says to run `outbox-relay
// migrate up`, exit 2.
func TestVerifyErrorsSayWhatToDo(t *testing.T) {
	url := testenv.CreateDatabase(t)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OUTBOX_SCHEMA=billing"}
	if code, _, errs := cli(t, env, "verify", "-since", "1h"); code != 2 || !strings.Contains(errs, "run `outbox-relay migrate up`") {
		t.Fatalf("verify of an unmigrated table: exit %d, want 2 and `outbox-relay migrate up`\n%s", code, errs)
	}
}

// TestVerifyInDeleteModeNeedsTheTopics: with OUTBOX_ON_PUBLISH=delete the
// table no longer names the topics of published rows, so verify refuses to
// run without -topics (exit 2, saying why) rather than check nothing and
// call it clean.
func TestVerifyInDeleteModeNeedsTheTopics(t *testing.T) {
	env := []string{"OUTBOX_DATABASE_URL=postgres://relay@127.0.0.1:1/none", "OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OUTBOX_ON_PUBLISH=delete"}
	code, _, errs := cli(t, env, "verify", "-since", "1h")
	if code != 2 || !strings.Contains(errs, "OUTBOX_ON_PUBLISH=delete") || !strings.Contains(errs, "-topics") {
		t.Fatalf("verify in delete mode without -topics: exit %d, want 2 and a reason naming -topics\n%s", code, errs)
	}
	if code, _, errs := cli(t, append(env[:2:2], "OUTBOX_ON_PUBLISH=purge"), "verify"); code != 2 || !strings.Contains(errs, "OUTBOX_ON_PUBLISH") {
		t.Fatalf("verify with OUTBOX_ON_PUBLISH=purge: exit %d, want 2 naming the variable\n%s", code, errs)
	}
}
