package integration

import (
	"context"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestMixedMarkAndDeleteRelaysUnderKillAndStop is the claim that relays in
// mark mode and in delete mode may run on one table (a rolling switch):
// two relay processes, one of each mode, share 4 shards under a steady
// writer, while the test kills one of them with SIGKILL and freezes the
// other with SIGSTOP for longer than the owner lease, round after round
// (OUTBOX_ADV_ROUNDS, default 6, about 30 s). Poison rows (headers that are
// not string to string, keyless so that they hold nothing) are written
// between the writer's rows. At the end every row the writer committed is in
// Kafka exactly once, in id order per key (read_committed), each settled
// once (marked, or deleted), and every poison row is in the dead-letter
// table and not in Kafka.
func TestMixedMarkAndDeleteRelaysUnderKillAndStop(t *testing.T) {
	rounds := 6
	if s := os.Getenv("OUTBOX_ADV_ROUNDS"); s != "" {
		rounds, _ = strconv.Atoi(s)
	}
	ctx := context.Background()
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 4, topic)
	recordDeletedIDs(t, db)
	base := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")),
		"OUTBOX_SHARDS=4", "OUTBOX_BATCH_SIZE=20", "OUTBOX_OWNER_LEASE=2s")
	envOf := map[string][]string{
		"mark":   append(slices.Clone(base), "OUTBOX_ON_PUBLISH=mark"),
		"delete": append(slices.Clone(base), "OUTBOX_ON_PUBLISH=delete"),
	}
	logs := newRelayLogs(t, "mixed")
	w := startLoadWriter(t, db, topic, loadKeys(40), time.Millisecond)
	defer w.halt()

	var poison []int64
	writePoison := func() {
		var id int64
		if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, headers) VALUES ($1, NULL, 'poison', '{"n": 1}') RETURNING id`, topic).Scan(&id); err != nil {
			t.Fatal(err)
		}
		poison = append(poison, id)
	}

	procs := map[string]*relayProcess{
		"mark":   startRelayProcess(t, bin, envOf["mark"], logs),
		"delete": startRelayProcess(t, bin, envOf["delete"], logs),
	}
	kills, stops := 0, 0
	for i := range rounds {
		writePoison()
		time.Sleep(time.Duration(300+rand.IntN(700)) * time.Millisecond)
		victim, other := "mark", "delete"
		if i%2 == 1 {
			victim, other = other, victim
		}
		procs[victim].kill(t)
		kills++
		// Freeze the survivor past its lease while the victim is down and
		// then back: the restarted victim takes the shards, the thawed
		// one is a zombie until it notices.
		procs[other].signal(t, syscall.SIGSTOP)
		stops++
		writePoison()
		procs[victim] = startRelayProcess(t, bin, envOf[victim], logs)
		time.Sleep(time.Duration(2500+rand.IntN(1000)) * time.Millisecond)
		procs[other].signal(t, syscall.SIGCONT)
		if procs[other].exited() {
			// It may exit on its own after losing its lease; restart it.
			procs[other] = startRelayProcess(t, bin, envOf[other], logs)
		}
	}
	written := w.stop(t)
	waitUntil(t, 60*time.Second, procs["mark"], "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	for _, p := range procs {
		p.signal(t, syscall.SIGTERM)
		p.wait(t, 40*time.Second)
	}

	dead := outboxDeadIDs(t, db)
	if !slices.Equal(dead, poison) {
		t.Errorf("dead letters %v, want the poison rows %v", dead, poison)
	}
	marked := outboxIDs(t, db, "published_at IS NOT NULL")
	var deleted []int64
	for _, id := range deletedIDs(t, db) {
		if !slices.Contains(poison, id) { // a dead letter's move deletes it too
			deleted = append(deleted, id)
		}
	}
	ids := append(slices.Clone(marked), deleted...)
	slices.Sort(ids)
	if n := len(slices.Compact(slices.Clone(ids))); n != len(ids) {
		t.Fatalf("a row was both marked and deleted")
	}
	if int64(len(ids)) != written {
		t.Fatalf("the writer committed %d rows; %d marked + %d deleted = %d", written, len(marked), len(deleted), len(ids))
	}
	seen := k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	t.Logf("%d rounds: %d kills, %d SIGSTOPs past the lease; %d rows (%d marked, %d deleted) exactly once in key order; %d poison rows dead-lettered",
		rounds, kills, stops, len(ids), len(marked), len(deleted), len(poison))
}

func outboxDeadIDs(t *testing.T, db *testenv.DB) []int64 {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), `SELECT id FROM outbox_dead_letter ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	var ids []int64
	for rows.Next() {
		var id int64
		if err := rows.Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	return ids
}
