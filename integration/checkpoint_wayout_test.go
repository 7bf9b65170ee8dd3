package integration

import (
	"context"
	"os/exec"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestForeignCheckpointRecordHasAWayOut (found by the adversarial tester:
// before the fix reshard exited 1 on the same record, so no documented
// procedure restarted the shard). A record that is not a checkpoint lands in
// a checkpoint partition (the tester got one there with the real binary by
// writing a row of another outbox table addressed to this relay's checkpoint
// topic). The shard stops, as README says, with the way out: stop every
// relay of the table, set a new OUTBOX_CHECKPOINT_TOPIC and record it with
// `outbox-relay reshard`. That reshard fences the old transactional id,
// warns that rows committed but not marked are published again, records the
// new topic, and the relay runs again.
func TestForeignCheckpointRecordHasAWayOut(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	cpTopic := testenv.RandomName("checkpoints-")
	name := testenv.RandomName("relay-")
	env := relayProcessEnv(db, k, name, cpTopic)
	logs := newRelayLogs(t, "cpwayout")
	db.Insert(t, topic, 20, nil)
	p := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 60*time.Second, p, "the rows are published", func() bool { return db.Unpublished(t) == 0 })
	p.signal(t, syscall.SIGTERM)
	p.wait(t, 30*time.Second)

	// What a row of another table, relayed by another relay, puts there.
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	rec := &kgo.Record{Topic: cpTopic, Partition: 0, Key: []byte("p1"), Value: []byte("an event of another outbox"),
		Headers: []kgo.RecordHeader{{Key: "outbox-id", Value: []byte("7")}}}
	if err := cl.ProduceSync(context.Background(), rec).FirstErr(); err != nil {
		t.Fatal(err)
	}

	// The documented way out.
	cmd := exec.Command(bin, "reshard")
	cmd.Env = append(append([]string{}, env...), "OUTBOX_CHECKPOINT_TOPIC="+cpTopic+"-new")
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the way out the relay prints (new OUTBOX_CHECKPOINT_TOPIC recorded with `outbox-relay reshard`) fails: %v\n%s", err, out)
	}
}
