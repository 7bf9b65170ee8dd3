package integration

import (
	"os"
	"os/exec"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestReshardInAnyModeRecoversTheOldShards (found by the adversarial
// tester: 450 records for 400 rows before the fix). An exactly-once relay
// with two shards is killed between its commits and marks; the operator then
// reshards to one shard in at-least-once mode. Reshard recovers every old
// shard from its checkpoint whatever OUTBOX_DELIVERY says now (it fences and
// marks as an exactly-once owner would), so the relay that runs afterwards,
// in the recorded mode, publishes nothing twice. BREAKER_RESHARD_MODE picks
// the mode of the reshard (default at-least-once).
func TestReshardInAnyModeRecoversTheOldShards(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-"))
	with := func(kv ...string) []string { return append(append([]string{}, env...), kv...) }
	reshard := func(e []string) {
		cmd := exec.Command(bin, "reshard")
		cmd.Env = e
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("reshard: %v\n%s", err, out)
		}
	}
	logs := newRelayLogs(t, "reshardmode")
	ids := db.Insert(t, topic, 400, loadKeys(20))
	reshard(with("OUTBOX_SHARDS=2"))

	// The rows are locked before the relay starts, so that it publishes
	// them and its marks wait, however fast it drains 400 rows.
	locks := lockUnpublishedRows(t, db)
	eo := startRelayProcess(t, bin, with("OUTBOX_SHARDS=2"), logs)
	waitUntil(t, 60*time.Second, eo, "two shards recovered", func() bool { return len(eo.log.find("shard recovered")) >= 2 })
	release := awaitBlockedMark(t, db, eo, locks)
	time.Sleep(500 * time.Millisecond) // let the other shard's mark block too
	eo.kill(t)
	release()
	t.Logf("exactly-once relay (2 shards) killed between commit and mark; %d rows unmarked", db.Unpublished(t))

	mode := "at-least-once"
	if m := os.Getenv("BREAKER_RESHARD_MODE"); m != "" {
		mode = m // exactly-once: the control, which holds
	}
	reshard(with("OUTBOX_SHARDS=1", "OUTBOX_DELIVERY="+mode))

	last := startRelayProcess(t, bin, with("OUTBOX_SHARDS=1", "OUTBOX_DELIVERY="+mode), logs)
	waitUntil(t, 60*time.Second, last, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	seen := k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
}
