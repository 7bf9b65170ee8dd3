package integration

import (
	"context"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// setOwnerLease sets OUTBOX_OWNER_LEASE in cfg.
func setOwnerLease(cfg *relay.Config, d time.Duration) { cfg.OwnerLease = d }

// frozenLease is OUTBOX_OWNER_LEASE in the frozen-owner test.
const frozenLease = 2 * time.Second

// withApplicationName returns the relay environment env with the database
// URL's application_name set to name, so that the test can tell the
// relays' sessions apart.
func withApplicationName(t *testing.T, env []string, name string) []string {
	t.Helper()
	out := make([]string, 0, len(env))
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "OUTBOX_DATABASE_URL="); ok {
			u, err := url.Parse(v)
			if err != nil {
				t.Fatal(err)
			}
			q := u.Query()
			q.Set("application_name", name)
			u.RawQuery = q.Encode()
			kv = "OUTBOX_DATABASE_URL=" + u.String()
		}
		out = append(out, kv)
	}
	return out
}

// auditMarks records, for every row marked published, the application_name
// of the session that marked it and when (database clock).
func auditMarks(t *testing.T, db *testenv.DB) {
	t.Helper()
	if _, err := db.Pool.Exec(context.Background(), `
CREATE TABLE mark_audit (id bigint NOT NULL, app text NOT NULL, at timestamptz NOT NULL DEFAULT clock_timestamp());
CREATE FUNCTION mark_audit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  INSERT INTO mark_audit (id, app) VALUES (NEW.id, current_setting('application_name'));
  RETURN NEW;
END $$;
CREATE TRIGGER mark_audit AFTER UPDATE OF published_at ON outbox FOR EACH ROW
  WHEN (OLD.published_at IS NULL AND NEW.published_at IS NOT NULL) EXECUTE FUNCTION mark_audit();`); err != nil {
		t.Fatal(err)
	}
}

// TestFrozenOwnerLosesItsShardsToTheStandby: the owner of the only shard is
// frozen with SIGSTOP under load (a VM pause, a wedged process): its TCP
// connections stay up, so its advisory lock stays held. The standby must see
// its lease expire, end its session, take the shard and publish within the
// lease plus a rebalance interval (plus recovery). Resumed with SIGCONT, the
// old owner must find out it lost the shard, say so, write and mark nothing,
// and wait as a standby. A read_committed consumer sees every row once.
func TestFrozenOwnerLosesItsShardsToTheStandby(t *testing.T) {
	ctx := context.Background()
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	auditMarks(t, db)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")),
		"OUTBOX_OWNER_LEASE="+frozenLease.String())
	const rebalance = 100 * time.Millisecond // relayProcessEnv's OUTBOX_REBALANCE_INTERVAL
	logs := newRelayLogs(t, "frozen")

	w := startLoadWriter(t, db, topic, loadKeys(20), 2*time.Millisecond)
	defer w.halt()
	a := startRelayProcess(t, bin, withApplicationName(t, env, "relay_a"), logs)
	waitUntil(t, 60*time.Second, a, `A's "shard recovered"`, func() bool { return len(a.log.find("shard recovered")) > 0 })
	b := startRelayProcess(t, bin, withApplicationName(t, env, "relay_b"), logs)
	waitUntil(t, 60*time.Second, b, `B's "relay started"`, func() bool { return len(b.log.find("relay started")) > 0 })
	waitUntil(t, 60*time.Second, a, "A publishes 200 rows", func() bool { return countPublished(t, db) >= 200 })
	if n := len(b.log.find("shard recovered")); n != 0 {
		t.Fatalf("the standby recovered %d shards while the owner ran", n)
	}

	a.signal(t, syscall.SIGSTOP)
	frozen := time.Now()
	var takeover time.Duration
	for {
		var n int
		if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM mark_audit WHERE app = 'relay_b'`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		if n > 0 {
			takeover = time.Since(frozen)
			break
		}
		if time.Since(frozen) > 30*time.Second {
			a.signal(t, syscall.SIGCONT)
			t.Fatalf("the standby marked no row within 30s of the owner's SIGSTOP (lease %v): a frozen owner keeps its shard\n%s", frozenLease, b.log.text())
		}
		if b.exited() {
			t.Fatalf("the standby exited: %v\n%s", b.state(), b.log.text())
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Lease, one rebalance tick to notice it, then recovery (InitProducerID
	// aborting the frozen owner's transaction, the checkpoint read) and a
	// first batch: a loaded machine gets 3 s for the latter.
	if limit := frozenLease + rebalance + 3*time.Second; takeover > limit {
		t.Errorf("the standby took %v from the owner's SIGSTOP to its first mark, want at most %v (lease %v + rebalance %v + 3s for recovery)",
			takeover, limit, frozenLease, rebalance)
	}
	if got := len(b.log.find("taking over shard from a stale owner")); got != 1 {
		t.Errorf("the standby logged %d takeovers, want 1\n%s", got, b.log.text())
	}

	time.Sleep(time.Second) // the standby publishes on; the old owner stays frozen
	a.signal(t, syscall.SIGCONT)
	resumed := time.Now()
	waitUntil(t, 30*time.Second, a, `A's "shard lost"`, func() bool { return len(a.log.find("shard lost")) > 0 })
	for _, e := range a.log.find("shard lost") {
		if e["level"] != "ERROR" {
			t.Errorf("the old owner logged %v at level %v, want ERROR", e, e["level"])
		}
	}
	time.Sleep(2 * time.Second) // long enough for a zombie to write, if it could

	written := w.stop(t)
	waitUntil(t, 90*time.Second, b, "the standby drains the outbox", func() bool { return db.Unpublished(t) == 0 })
	if a.exited() {
		t.Fatalf("the old owner exited after SIGCONT (%v), want it to wait as a standby\n%s", a.state(), a.log.text())
	}
	if got := len(a.log.find("shard recovered")); got != 1 {
		t.Errorf("the old owner recovered %d times, want once (before it was frozen): it took the shard back\n%s", got, a.log.text())
	}

	// PostgreSQL: nothing marked by the old owner after the standby took
	// the shard (its marks carry a lease token that is no longer current).
	var late int
	var takenAt time.Time
	if err := db.Pool.QueryRow(ctx, `SELECT taken_at FROM outbox_owner WHERE shard = 0`).Scan(&takenAt); err != nil {
		t.Fatal(err)
	}
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM mark_audit WHERE app = 'relay_a' AND at >= $1`, takenAt).Scan(&late); err != nil {
		t.Fatal(err)
	}
	if late > 0 {
		t.Errorf("the old owner marked %d rows after the standby took the shard", late)
	}
	if n := deadLetters(t, db); n > 0 {
		t.Errorf("%d rows were dead-lettered", n)
	}

	// Kafka: the old owner committed nothing after the standby's producer
	// fenced it: every committed record of an older epoch precedes, in its
	// partition, every record of the standby's epoch.
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written {
		t.Fatalf("the writers committed %d rows, the outbox holds %d", written, len(ids))
	}
	recs, err := faultsReadCommitted(k.Brokers, topic, len(ids), 60*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	inits := b.log.find("producer initialized, earlier producers fenced")
	if len(inits) == 0 {
		t.Fatalf("the standby logged no producer initialization\n%s", b.log.text())
	}
	epochB := int16(sumField(inits[:1], "epoch"))
	firstB := map[int32]int64{}
	for _, r := range recs {
		if r.ProducerEpoch >= epochB {
			if _, ok := firstB[r.Partition]; !ok {
				firstB[r.Partition] = r.Offset
			}
		} else if off, ok := firstB[r.Partition]; ok && r.Offset > off {
			t.Errorf("partition %d offset %d: a record of the old owner's epoch %d committed after the standby's (epoch %d) first record at %d",
				r.Partition, r.Offset, r.ProducerEpoch, epochB, off)
		}
	}
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second))
	t.Logf("lease %v, rebalance %v: the standby marked its first row %v after the owner's SIGSTOP; resumed %v later, the old owner said it lost the shard and changed nothing; %d rows exactly once",
		frozenLease, rebalance, takeover.Round(time.Millisecond), resumed.Sub(frozen).Round(time.Millisecond), len(ids))

	for _, p := range []*relayProcess{a, b} {
		p.signal(t, syscall.SIGTERM)
		if st := p.wait(t, 40*time.Second); st.ExitCode() != 0 {
			t.Errorf("after SIGTERM a relay exited with %v, want 0\n%s", st, p.log.text())
		}
	}
}

// TestWedgedWorkerLosesItsShardAndItsLateMarkIsRefused: relay A's shard
// worker hangs after a Kafka commit, before its mark (a wedged goroutine; the
// process and its ownership loop live on). A must stop renewing the lease;
// relay B, a standby, takes the shard over within about the lease, recovers
// it (marking A's committed batch from the checkpoint) and publishes on. When
// A's worker wakes up, its mark is refused (the lease token is no longer
// current): A logs that it lost the shard and changes no row. Every row
// reaches Kafka exactly once.
func TestWedgedWorkerLosesItsShardAndItsLateMarkIsRefused(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)
	cfg := testenv.RelayConfig(db, k)
	setOwnerLease(&cfg, frozenLease)

	held := make(chan []int64, 1)
	wake := make(chan struct{})
	var once sync.Once
	unwedge := func() { once.Do(func() { close(wake) }) }
	t.Cleanup(unwedge)
	var wedged atomic.Bool
	wedge := func(_ context.Context, name string, _ int32, batch []int64) error {
		if name == relay.FailAfterCommit && wedged.CompareAndSwap(false, true) {
			held <- append([]int64(nil), batch...)
			<-wake // deaf to cancellation: wedged
		}
		return nil
	}
	a := startIdentityRelay(t, db, cfg, relay.WithFailpoint(wedge))
	var batch []int64
	select {
	case batch = <-held:
	case <-time.After(30 * time.Second):
		t.Fatal("relay A never committed a batch")
	}
	since := time.Now()
	b := startIdentityRelay(t, db, cfg)
	var takeover time.Duration
	for {
		if b.owned(t) == 1 && db.Unpublished(t) == 0 {
			takeover = time.Since(since)
			break
		}
		if time.Since(since) > 20*time.Second {
			t.Fatalf("relay B did not take over the wedged worker's shard within 20s (B owns %v shards, %d rows unpublished)", b.owned(t), db.Unpublished(t))
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := k.NewConsumer(t, topic)
	testenv.CheckExactlyOnce(t, ids, c.WaitFor(t, len(ids), 30*time.Second))

	// A's worker wakes up and marks its batch: refused.
	unwedge()
	faultsEventually(t, 20*time.Second, "A logs that it lost the shard", func() bool {
		return faultsLogHas(a.logs.String(), `"level":"ERROR"`, `"msg":"shard lost"`, outbox.ErrLeaseLost.Error())
	})
	if got := counter(t, a.reg, "outbox_relay_published_records_total", nil); got != 0 {
		t.Errorf("A counts %v published records; its batch was published by B's recovery", got)
	}
	if got := a.owned(t); got != 0 {
		t.Errorf("A owns %v shards after losing its lease, want 0", got)
	}
	more := db.Insert(t, topic, 20, faultsKeys)
	all := append(append([]int64(nil), ids...), more...)
	testenv.CheckExactlyOnce(t, all, c.WaitFor(t, len(all), 30*time.Second))
	select {
	case err := <-a.done:
		t.Fatalf("relay A stopped (%v), want it to wait as a standby", err)
	default:
	}
	t.Logf("lease %v: B took over and marked A's committed batch of %d rows %v after A's worker wedged; A's late mark was refused",
		frozenLease, len(batch), takeover.Round(time.Millisecond))
}

// TestFrozenOwnerOfSeveralShardsLosesThemAll: with four shards, A and B own
// two each. A is frozen; it still counts as a member (its session lives),
// so B's fair share stays two, yet B must take A's two shards as their
// leases expire, and the rows of every key still arrive exactly once. When A
// is resumed, the shards are shared again.
func TestFrozenOwnerOfSeveralShardsLosesThemAll(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 4, topic)
	env := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")),
		"OUTBOX_OWNER_LEASE="+frozenLease.String(), "OUTBOX_SHARDS=4")
	logs := newRelayLogs(t, "frozen-shards")
	w := startLoadWriter(t, db, topic, loadKeys(40), 2*time.Millisecond)
	defer w.halt()

	a := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 60*time.Second, a, "A recovers four shards", func() bool { return len(a.log.find("shard recovered")) >= 4 })
	b := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 60*time.Second, b, "B takes two shards", func() bool { return len(b.log.find("shard recovered")) >= 2 })
	waitUntil(t, 60*time.Second, a, "A hands two over", func() bool { return len(a.log.find("shard handed over for balance")) >= 2 })

	a.signal(t, syscall.SIGSTOP)
	frozen := time.Now()
	// Ending A's session for the first stale lease frees both its shards.
	waitUntil(t, 30*time.Second, b, "B takes A's two shards over", func() bool {
		return len(b.log.find("taking over shard from a stale owner")) >= 1 && len(b.log.find("shard recovered")) >= 4
	})
	takeover := time.Since(frozen)
	a.signal(t, syscall.SIGCONT)
	waitUntil(t, 30*time.Second, a, `A's "shard lost"`, func() bool { return len(a.log.find("shard lost")) >= 2 })
	time.Sleep(time.Second)

	written := w.stop(t)
	waitUntil(t, 90*time.Second, b, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written {
		t.Fatalf("the writers committed %d rows, the outbox holds %d", written, len(ids))
	}
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second))
	t.Logf("4 shards, lease %v: B had taken over and recovered both of A's shards %v after A's SIGSTOP; %d rows exactly once",
		frozenLease, takeover.Round(time.Millisecond), len(ids))
	for _, p := range []*relayProcess{a, b} {
		p.signal(t, syscall.SIGTERM)
		if st := p.wait(t, 40*time.Second); st.ExitCode() != 0 {
			t.Errorf("after SIGTERM a relay exited with %v, want 0\n%s", st, p.log.text())
		}
	}
}
