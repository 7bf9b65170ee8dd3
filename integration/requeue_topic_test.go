package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// requeueGoneTopicBound is how soon, after a dead letter is requeued into a
// topic deleted moments before, it must be dead-lettered again and the rows
// of another topic written at the same time published: the README's "about
// 1 s" for a missing topic, with slack for a loaded machine.
const requeueGoneTopicBound = 5 * time.Second

// TestRequeueIntoATopicDeletedMomentsAgoDoesNotStallTheShard: the relay has
// published to a topic (so its producer knows it), a row of that topic is
// dead-lettered, the operator fixes it, deletes the topic and requeues the
// row at once. The row is dead-lettered again with an error naming the
// topic, and rows of another topic, written with the requeue, flow: both
// within requeueGoneTopicBound, not after the client's produce retries.
func TestRequeueIntoATopicDeletedMomentsAgoDoesNotStallTheShard(t *testing.T) {
	for _, mode := range []txn.Mode{txn.ExactlyOnce, txn.AtLeastOnce} {
		t.Run(string(mode), func(t *testing.T) { requeueIntoDeletedTopic(t, mode) })
	}
}

func requeueIntoDeletedTopic(t *testing.T, mode txn.Mode) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic, doomed := testenv.RandomName("payments-"), testenv.RandomName("doomed-")
	k := topicsKafka(t, false, topic, doomed)
	first := db.Insert(t, doomed, 10, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = string(mode)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	testenv.CheckExactlyOnce(t, first, k.NewConsumer(t, doomed).WaitFor(t, len(first), 30*time.Second))

	// A row of doomed with a reserved header is dead-lettered; the
	// operator fixes the header.
	var poison int64
	if err := db.Pool.QueryRow(ctx, `INSERT INTO `+db.Table.Ident()+` (topic, key, value, headers) VALUES ($1, 'acct-poison', 'v', '{"outbox-id":"1"}') RETURNING id`,
		doomed).Scan(&poison); err != nil {
		t.Fatal(err)
	}
	faultsEventually(t, 30*time.Second, "the poison row dead-lettered", func() bool { return db.Unpublished(t) == 0 })
	if _, err := db.Pool.Exec(ctx, `UPDATE `+db.Table.DeadLetterIdent()+` SET headers = NULL WHERE id = $1`, poison); err != nil {
		t.Fatal(err)
	}

	// A first row of the other topic: the producer's client loads its
	// metadata now, so the deletion below meets a client that updated its
	// metadata moments ago (and waits its minimum age, 5 s, before the
	// next update that would tell it the topic is gone).
	warm := db.Insert(t, topic, 1, faultsKeys)
	faultsEventually(t, 30*time.Second, "the first row of "+topic+" published", func() bool { return db.Unpublished(t) == 0 })

	// The topic is deleted, and the row requeued at once, with rows of
	// another topic.
	if _, err := k.Admin(t).DeleteTopics(ctx, doomed); err != nil {
		t.Fatal(err)
	}
	st := outbox.NewStore(db.Pool, db.Table)
	start := time.Now()
	if ids, err := st.Requeue(ctx, []int64{poison}); err != nil || len(ids) != 1 {
		t.Fatalf("requeue %d: %v %v", poison, ids, err)
	}
	good := db.Insert(t, topic, 20, faultsKeys)
	took := topicsWaitSettled(t, db, start)
	t.Logf("requeued row dead-lettered again and %d rows of %s published %v after the requeue", len(good), topic, took.Round(time.Millisecond))
	testenv.CheckExactlyOnce(t, append(warm, good...), k.NewConsumer(t, topic).WaitFor(t, len(warm)+len(good), 30*time.Second))
	dead, err := st.ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	if len(dead) != 1 || dead[0].ID != poison || !strings.Contains(dead[0].Error, doomed) {
		t.Fatalf("dead letters = %+v, want only row %d with an error naming %s", dead, poison, doomed)
	}
	if took > requeueGoneTopicBound {
		t.Errorf("the requeued row and the other topic's rows settled %v after the requeue, more than %v: the deleted topic stalled the shard", took.Round(time.Millisecond), requeueGoneTopicBound)
	}
}
