package integration

import (
	"context"
	"math/rand/v2"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestSwitchPollReplicationPollUnderKillNine switches one table's relay from
// poll to replication and back, three times, as OS processes killed with
// SIGKILL at the switch while writers keep inserting: one held between the
// switch back's drain of the slot and its marks (the test locks the table,
// so the marks wait), kills at random moments of the start (the hand-over
// in either direction), one right after the poll read recovered, and one
// while each source publishes. A last
// poll run drains the outbox and stops with SIGTERM. A read_committed
// consumer must see every row exactly once, in id order per key, and the
// switch back must leave no slot keeping WAL.
func TestSwitchPollReplicationPollUnderKillNine(t *testing.T) {
	bin := buildRelayBinary(t)
	db := logicalDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	base := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")), "OUTBOX_DEAD_LETTER_ORDER=skip")
	env := func(source string) []string { return append(slices.Clone(base), "OUTBOX_SOURCE="+source) }
	logs := newRelayLogs(t, "switch")
	ctx := context.Background()

	w := startLoadWriter(t, db, topic, loadKeys(20), 2*time.Millisecond)
	defer w.halt()

	killAfter := func(p *relayProcess, what string, d time.Duration) {
		t.Helper()
		time.Sleep(d)
		if p.exited() {
			t.Fatalf("%s: the relay exited on its own before the kill: %v\n%s", what, p.state(), p.log.text())
		}
		p.kill(t)
		if st := p.state(); !killedBySIGKILL(st) {
			t.Fatalf("%s: the relay was not killed by SIGKILL but ended with %v\n%s", what, st, p.log.text())
		}
	}
	logged := func(p *relayProcess, msg string) func() bool {
		return func() bool { return len(p.log.find(msg)) > 0 }
	}
	random := func() time.Duration { return time.Duration(50+rand.IntN(750)) * time.Millisecond }
	var switchedBack, handedOver, heldKills int
	for phase := range 6 {
		if phase%2 == 0 {
			// Poll to replication.
			p := startRelayProcess(t, bin, env("replication"), logs)
			killAfter(p, "replication start", random())
			p = startRelayProcess(t, bin, env("replication"), logs)
			waitUntil(t, 90*time.Second, p, "the replication stream", logged(p, "replication stream started"))
			w.burst(t, db, topic, 150)
			killAfter(p, "replication publishing", random())
			handedOver++
			continue
		}
		// Replication back to poll: the first poll run always finds
		// the replication source's checkpoint.
		p := startRelayProcess(t, bin, env("poll"), logs)
		waitUntil(t, 90*time.Second, p, "the switch back's drain", logged(p, "switch back to the poll read: draining the slot"))
		tx, err := db.Pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := tx.Exec(ctx, `LOCK TABLE outbox IN SHARE MODE`); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, 60*time.Second, p, "the switch back's marks to wait for the test's lock", func() bool {
			var n int
			err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE 'UPDATE %SET published_at = now()%FROM unnest%'`).Scan(&n)
			return err == nil && n > 0
		})
		p.kill(t)
		if err := tx.Rollback(ctx); err != nil {
			t.Fatal(err)
		}
		heldKills++

		p = startRelayProcess(t, bin, env("poll"), logs)
		killAfter(p, "poll start", random())
		if len(p.log.find("switched back to the poll read")) > 0 {
			switchedBack++
		}

		// The switch back done by now, or right here.
		p = startRelayProcess(t, bin, env("poll"), logs)
		waitUntil(t, 90*time.Second, p, "poll recovery", logged(p, "shard recovered"))
		killAfter(p, "just after the switch back", 0)
		if len(p.log.find("switched back to the poll read")) > 0 {
			switchedBack++
		}

		p = startRelayProcess(t, bin, env("poll"), logs)
		waitUntil(t, 90*time.Second, p, "poll recovery", logged(p, "shard recovered"))
		w.burst(t, db, topic, 150)
		killAfter(p, "poll publishing", random())
	}

	if switchedBack < 3 {
		t.Errorf("%d switches back were logged, want 3 (one in each poll phase)", switchedBack)
	}
	written := w.stop(t)
	last := startRelayProcess(t, bin, env("poll"), logs)
	waitUntil(t, 120*time.Second, last, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	last.signal(t, syscall.SIGTERM)
	if st := last.wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the relay exited with %v\n%s", st, last.log.text())
	}
	var slots []string
	rows, err := db.Pool.Query(ctx, `SELECT slot_name FROM pg_replication_slots`)
	if err != nil {
		t.Fatal(err)
	}
	if slots, err = pgx.CollectRows(rows, pgx.RowTo[string]); err != nil {
		t.Fatal(err)
	}
	if len(slots) > 0 {
		t.Errorf("after the switch back to poll, slots %v still keep WAL", slots)
	}
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written {
		t.Fatalf("the writers committed %d rows, the outbox holds %d", written, len(ids))
	}
	if n := deadLetters(t, db); n > 0 {
		t.Fatalf("%d rows were dead-lettered; none of these rows is invalid", n)
	}
	seen := k.NewConsumer(t, topic).WaitFor(t, len(ids), 120*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	t.Logf("%d switches to replication, %d back to poll, %d kills held between the drain and the marks; %d rows checked exactly once",
		handedOver, switchedBack, heldKills, len(ids))
}
