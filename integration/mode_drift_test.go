package integration

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestRelayWithAnotherDeliveryModeRefusesToRun (found by the adversarial
// tester: 250 records for 200 rows before the fix). An exactly-once relay
// killed between its Kafka commit and its mark leaves committed rows
// unmarked, listed in its checkpoint; an at-least-once relay never reads the
// checkpoint (and its producer fences nothing), so it would publish them a
// second time. OUTBOX_DELIVERY is recorded with the shard count, relay name
// and checkpoint topic: the at-least-once relay refuses to run, naming the
// variable and `outbox-relay reshard`; an exactly-once relay then publishes
// every row once.
func TestRelayWithAnotherDeliveryModeRefusesToRun(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-"))
	logs := newRelayLogs(t, "modedrift")

	ids := db.Insert(t, topic, 200, loadKeys(10))

	// 1. exactly-once relay, killed with a committed batch waiting for its
	// mark: the rows are locked before it starts, so that it publishes them
	// and its mark waits, however fast it drains 200 rows.
	locks := lockUnpublishedRows(t, db)
	eo := startRelayProcess(t, bin, env, logs)
	release := awaitBlockedMark(t, db, eo, locks)
	eo.kill(t)
	release()
	unmarked := db.Unpublished(t)
	t.Logf("exactly-once relay killed between commit and mark; %d rows unmarked", unmarked)

	// 2. the same table, relay name and checkpoint topic, another mode.
	alo := startRelayProcess(t, bin, append(append([]string{}, env...), "OUTBOX_DELIVERY=at-least-once"), logs)
	deadline := time.Now().Add(60 * time.Second)
	for db.Unpublished(t) > 0 && !alo.exited() && time.Now().Before(deadline) {
		time.Sleep(100 * time.Millisecond)
	}
	if !alo.exited() {
		alo.kill(t)
		t.Fatalf("the at-least-once relay ran on a table relayed exactly-once (%d rows unpublished of %d)", db.Unpublished(t), len(ids))
	}
	if st := alo.state(); st.ExitCode() != 1 || !strings.Contains(alo.log.text(), "OUTBOX_DELIVERY") || !strings.Contains(alo.log.text(), "outbox-relay reshard") {
		t.Fatalf("the at-least-once relay exited %v; want exit 1 naming OUTBOX_DELIVERY and `outbox-relay reshard`:\n%s", st, alo.log.text())
	}
	if n := db.Unpublished(t); n != unmarked {
		t.Fatalf("%d rows unpublished after the refusal, want %d: the refused relay changed rows", n, unmarked)
	}
	last := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 60*time.Second, last, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second))
}
