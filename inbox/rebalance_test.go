package inbox_test

import (
	"context"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/inbox"
)

// TestRebalancesBetweenConsumersApplyEachEventOnce: two instances share a
// six-partition topic while a producer writes; instances join and leave
// (clean stops, and one that is abandoned mid-transaction, as a crashed
// process would be), so partitions move back and forth under load. Every
// event is applied exactly once, and both instances did part of the work.
func TestRebalancesBetweenConsumersApplyEachEventOnce(t *testing.T) {
	t.Parallel()
	const partitions = 6
	e := newEnv(t, partitions)
	p := e.producer(t)

	var (
		produced atomic.Int64
		stopProd = make(chan struct{})
		prodDone = make(chan struct{})
	)
	go func() {
		defer close(prodDone)
		for next := int64(1); ; next += 30 {
			select {
			case <-stopProd:
				return
			case <-time.After(20 * time.Millisecond):
			}
			p.sendIDs(t, next, next+29, partitions)
			produced.Store(next + 29)
		}
	}()
	defer func() {
		select {
		case <-stopProd:
		default:
			close(stopProd)
		}
		<-prodDone
	}()

	// A handler slow enough that transactions are open when partitions
	// move.
	h := func(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
		if rand.IntN(20) == 0 {
			time.Sleep(5 * time.Millisecond)
		}
		return record(ctx, tx, ev)
	}
	var (
		mu      sync.Mutex
		all     []*running
		applied = map[string]int64{}
	)
	run := func(name string, opts ...inbox.Option) *running {
		r := start(t, e, e.config(), h, opts...)
		mu.Lock()
		all = append(all, r)
		mu.Unlock()
		return r
	}
	settle := func(name string, r *running) {
		mu.Lock()
		applied[name] += r.in.Stats().Applied
		mu.Unlock()
	}
	pause := func() { time.Sleep(time.Duration(600+rand.IntN(400)) * time.Millisecond) }

	a := run("a")
	pause()
	b := run("b")
	pause()
	if err := a.stop(); err != nil {
		t.Fatalf("a: %v", err)
	}
	settle("a", a)
	// c crashes inside a transaction, after its handlers ran.
	var crashed atomic.Bool
	c := run("c", inbox.WithFailpoint(func(_ context.Context, name, _ string, _ int32, _ []int64) error {
		if name == inbox.FailBeforeCommit && !crashed.Load() && rand.IntN(10) == 0 {
			crashed.Store(true)
			return errCrash
		}
		return nil
	}))
	if err := c.wait(t, 30*time.Second); err != errCrash {
		t.Fatalf("c: %v, want the simulated crash", err)
	}
	settle("a", c)
	a2 := run("a")
	pause()
	if err := b.stop(); err != nil {
		t.Fatalf("b: %v", err)
	}
	settle("b", b)
	b2 := run("b")
	pause()

	close(stopProd)
	<-prodDone
	total := produced.Load()
	waitFor(t, 60*time.Second, "every event applied", func() bool {
		return e.count(t, `SELECT count(*) FROM inbox_applied`) >= total
	})
	for name, r := range map[string]*running{"a": a2, "b": b2} {
		if err := r.stop(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		settle(name, r)
	}
	e.checkExactlyOnce(t, ids(1, total))
	var assignments, fenced int64
	for _, r := range all {
		st := r.in.Stats()
		assignments += st.Assignments
		fenced += st.Fenced
	}
	t.Logf("%d events; applied by a %d, by b %d; %d partition assignments, %d fenced transactions", total, applied["a"], applied["b"], assignments, fenced)
	if applied["a"] == 0 || applied["b"] == 0 {
		t.Errorf("one instance did no work (a %d, b %d): the partitions were not shared", applied["a"], applied["b"])
	}
	if assignments < 2*partitions {
		t.Errorf("only %d partition assignments: the partitions did not move enough", assignments)
	}
}

type crash struct{}

func (crash) Error() string { return "simulated crash" }

var errCrash error = crash{}
