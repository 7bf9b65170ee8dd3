package inbox_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/inbox"
)

// gate is a failpoint that, once armed, holds the first batch that reaches
// point until released.
type gate struct {
	point   string
	armed   atomic.Bool
	hitOnce sync.Once
	hit     chan struct{}
	open    chan struct{}
}

func newGate(point string) *gate {
	return &gate{point: point, hit: make(chan struct{}), open: make(chan struct{})}
}

func (g *gate) failpoint(ctx context.Context, name, _ string, _ int32, _ []int64) error {
	if name != g.point || !g.armed.Load() {
		return nil
	}
	g.hitOnce.Do(func() { close(g.hit) })
	select {
	case <-g.open:
	case <-ctx.Done():
	}
	return nil
}

func (g *gate) waitHit(t *testing.T, what string) {
	t.Helper()
	select {
	case <-g.hit:
	case <-time.After(30 * time.Second):
		t.Fatalf("%s never reached %s", what, g.point)
	}
}

func (g *gate) release() { g.armed.Store(false); close(g.open) }

func (e *env) epoch(t *testing.T) int64 {
	t.Helper()
	return e.count(t, `SELECT epoch FROM inbox_offsets WHERE consumer_group = $1 AND topic = $2 AND partition = 0`, e.group, e.topic)
}

// TestZombieInstanceCannotCommit: instance A holds records it fetched and
// is frozen before its transaction; a replacement B (same InstanceID, as a
// restarted pod) is assigned the partition. When A wakes up, its
// transaction finds another epoch and commits nothing: no effect, no
// offset moved; B applies the records once.
func TestZombieInstanceCannotCommit(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	p := e.producer(t)
	p.sendIDs(t, 1, 20, 1)
	cfg := e.config()
	cfg.InstanceID = "ledger-0"

	gateA := newGate(inbox.FailBeforeApply)
	a := start(t, e, cfg, record, inbox.WithFailpoint(gateA.failpoint))
	waitFor(t, 30*time.Second, "A applying 20 events", func() bool { return a.in.Stats().Applied >= 20 })
	epochA := e.epoch(t)
	nextBefore := e.storedOffsets(t)[0]
	gateA.armed.Store(true)
	p.sendIDs(t, 21, 30, 1)
	gateA.waitHit(t, "A")

	gateB := newGate(inbox.FailBeforeApply)
	gateB.armed.Store(true)
	b := start(t, e, cfg, record, inbox.WithFailpoint(gateB.failpoint))
	waitFor(t, 30*time.Second, "B's assignment in the database", func() bool { return e.epoch(t) > epochA })
	gateB.waitHit(t, "B")

	gateA.release()
	waitFor(t, 30*time.Second, "A fenced (or committing)", func() bool { st := a.in.Stats(); return st.Fenced+st.Applied > 20 })
	if st := a.in.Stats(); st.Applied != 20 || st.Fenced != 1 {
		t.Fatalf("the zombie applied %d events after losing the partition (fenced %d times)", st.Applied-20, st.Fenced)
	}
	if n := e.count(t, `SELECT count(*) FROM effects`); n != 20 {
		t.Fatalf("%d effects after the zombie woke up, want 20: the zombie committed", n)
	}
	if next := e.storedOffsets(t)[0]; next != nextBefore {
		t.Fatalf("the zombie moved the offset from %d to %d", nextBefore, next)
	}

	gateB.release()
	waitFor(t, 30*time.Second, "B applying 10 events", func() bool { return b.in.Stats().Applied >= 10 })
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	t.Logf("the zombie's Run ended with: %v", a.stop())
	e.checkExactlyOnce(t, ids(1, 30))
}

// TestAssignmentWaitsForTheOldOwnersOpenTransaction: the other order of
// the same window. A's transaction is open (handlers ran, not committed)
// when B is assigned the partition: B's assignment waits for the row lock,
// A commits, and B starts after A's last event: nothing is applied twice.
func TestAssignmentWaitsForTheOldOwnersOpenTransaction(t *testing.T) {
	t.Parallel()
	e := newEnv(t, 1)
	p := e.producer(t)
	p.sendIDs(t, 1, 20, 1)
	cfg := e.config()
	cfg.InstanceID = "ledger-0"

	gateA := newGate(inbox.FailBeforeCommit)
	a := start(t, e, cfg, record, inbox.WithFailpoint(gateA.failpoint))
	waitFor(t, 30*time.Second, "A applying 20 events", func() bool { return a.in.Stats().Applied >= 20 })
	epochA := e.epoch(t)
	gateA.armed.Store(true)
	p.sendIDs(t, 21, 30, 1)
	gateA.waitHit(t, "A")

	b := start(t, e, cfg, record)
	waitFor(t, 30*time.Second, "B's assignment waiting for A's row lock", func() bool {
		return e.count(t, `SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO %inbox_offsets%'`) > 0
	})
	if e.epoch(t) != epochA {
		t.Fatal("B's assignment committed while A's transaction held the partition")
	}
	gateA.release()
	waitFor(t, 30*time.Second, "B's assignment", func() bool { return e.epoch(t) > epochA })
	waitFor(t, 30*time.Second, "A's commit counted", func() bool { return a.in.Stats().Applied >= 30 })
	p.sendIDs(t, 31, 35, 1)
	waitFor(t, 30*time.Second, "B applying 5 new events", func() bool { return b.in.Stats().Applied >= 5 })
	time.Sleep(300 * time.Millisecond)
	if err := b.stop(); err != nil {
		t.Fatal(err)
	}
	a.stop()
	if st := b.in.Stats(); st.Applied != 5 || st.Redelivered+st.Duplicates != 0 {
		t.Errorf("B: %+v; want exactly the 5 new events, nothing seen again", st)
	}
	e.checkExactlyOnce(t, ids(1, 35))
}
