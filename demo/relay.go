package demo

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/relay"
)

// relayRunner runs the relay, and with chaos starts a new instance after
// every crash, as a process supervisor would.
type relayRunner struct {
	cfg   relay.Config
	pool  *pgxpool.Pool
	log   *slog.Logger
	chaos *chaos // nil: no crashes
	out   *printer

	crashes atomic.Int64
	mu      sync.Mutex
	byPoint map[string]int
}

// maxRelayFailures is how many times in a row the runner restarts a relay
// that stopped with an error of its own (not a chaos crash) before giving up.
const maxRelayFailures = 5

// run returns nil when ctx ends, or the error that stopped the relay.
func (rr *relayRunner) run(ctx context.Context) error {
	failures := 0
	for {
		opts := []relay.Option{relay.WithLogger(rr.log)}
		if rr.chaos != nil {
			opts = append(opts, relay.WithFailpoint(rr.chaos.failpoint))
		}
		r, err := relay.New(rr.cfg, rr.pool, opts...)
		if err != nil {
			return err
		}
		err = r.Run(ctx)
		if ctx.Err() != nil {
			return nil
		}
		var crash chaosCrash
		switch {
		case errors.As(err, &crash):
			failures = 0
			rr.crashes.Add(1)
			rr.mu.Lock()
			if rr.byPoint == nil {
				rr.byPoint = map[string]int{}
			}
			rr.byPoint[crash.point]++
			rr.mu.Unlock()
			rr.log.Warn("demo: relay crashed on purpose (-chaos); starting a new instance", "point", crash.point, "shard", crash.shard, "rows", crash.rows)
			what := crashWhat[crash.point]
			if w, ok := crashWhatByMode[rr.cfg.Delivery+" "+crash.point]; ok {
				what = w
			}
			rr.out.event("chaos: relay killed %s", fmt.Sprintf(what, plural(crash.rows, "row")))
			continue
		case err == nil:
			return errors.New("relay stopped on its own")
		case rr.chaos != nil && failures < maxRelayFailures:
			// With a failpoint installed the relay stops at any failed
			// batch, as a crash: restart it like the chaos crashes.
			failures++
			rr.log.Warn("demo: relay stopped; starting a new instance", "err", err)
			rr.out.event("relay stopped: %v; starting a new instance", err)
		default:
			return fmt.Errorf("relay: %w", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// crashSummary says where the crashes happened, e.g.
// "after-commit 2, before-commit 1".
func (rr *relayRunner) crashSummary() string {
	rr.mu.Lock()
	defer rr.mu.Unlock()
	if len(rr.byPoint) == 0 {
		return "none happened: run longer, or with a shorter -chaos-every"
	}
	var parts []string
	for p, n := range rr.byPoint {
		parts = append(parts, fmt.Sprintf("%s %d", p, n))
	}
	sort.Strings(parts)
	return strings.Join(parts, ", ")
}

// crashPointsOf lists the failpoints a relay in delivery mode passes.
func crashPointsOf(delivery string) []string {
	switch delivery {
	case "at-least-once":
		return []string{relay.FailAfterCommit, relay.FailAfterMark}
	case "at-most-once":
		return []string{relay.FailAfterMark}
	}
	return []string{relay.FailBeforeCommit, relay.FailAfterCommit, relay.FailAfterMark}
}

var (
	// crashWhatByMode overrides crashWhat for the other delivery modes.
	crashWhatByMode = map[string]string{
		"at-least-once " + relay.FailAfterCommit: "after Kafka acknowledged %s, before the mark in PostgreSQL: the new relay sends them again (duplicates)",
		"at-least-once " + relay.FailAfterMark:   "after sending and marking %s: the new relay goes on with the next rows",
		"at-most-once " + relay.FailAfterMark:    "after marking %s published, before sending them: they are lost, and the new relay reports it",
	}
	crashWhat = map[string]string{
		relay.FailBeforeCommit: "inside a Kafka transaction of %s: the new relay's InitProducerID aborts it, the rows go out again",
		relay.FailAfterCommit:  "after the Kafka commit of %s, before the mark in PostgreSQL: the new relay marks them from the checkpoint",
		relay.FailAfterMark:    "after committing and marking %s: the new relay goes on with the next rows",
	}
)

// chaosCrash is the error a chaos failpoint stops the relay with.
type chaosCrash struct {
	point string
	shard int32
	rows  int
}

func (c chaosCrash) Error() string {
	return fmt.Sprintf("simulated crash at %s (shard %d, %d rows)", c.point, c.shard, c.rows)
}

// chaos arms a crash at a random point of the relay's publish loop (or of
// the ledger's apply loop) every few seconds; the next batch to pass that
// point stops the relay (or the ledger's consumer) there at once, as a
// killed process would: no abort, no mark, no clean-up.
type chaos struct {
	points  []string // the failpoints to arm: the ones the process passes
	mu      sync.Mutex
	armed   string
	stopped bool
}

// fire reports whether a crash is armed at point, and disarms it.
func (c *chaos) fire(point string) bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.armed != point {
		return false
	}
	c.armed = ""
	return true
}

func (c *chaos) failpoint(_ context.Context, name string, shard int32, ids []int64) error {
	if !c.fire(name) {
		return nil
	}
	return chaosCrash{point: name, shard: shard, rows: len(ids)}
}

// run arms a crash every half to one and a half times every, until ctx ends.
func (c *chaos) run(ctx context.Context, every time.Duration) {
	for {
		d := every/2 + rand.N(every)
		select {
		case <-ctx.Done():
			return
		case <-time.After(d):
		}
		c.mu.Lock()
		if c.armed == "" && !c.stopped {
			c.armed = c.points[rand.IntN(len(c.points))]
		}
		c.mu.Unlock()
	}
}

// stop disarms the pending crash and arms no more.
func (c *chaos) stop() {
	c.mu.Lock()
	c.armed, c.stopped = "", true
	c.mu.Unlock()
}

// printer writes the demo's output: a live status line, overwritten in
// place on a terminal and printed as plain lines otherwise, and events and
// text between status lines.
type printer struct {
	mu   sync.Mutex
	w    io.Writer
	tty  bool
	live bool // a status line is on screen without its newline
}

func newPrinter(w io.Writer) *printer {
	p := &printer{w: w}
	if f, ok := w.(*os.File); ok {
		if fi, err := f.Stat(); err == nil && fi.Mode()&os.ModeCharDevice != 0 && os.Getenv("TERM") != "dumb" {
			p.tty = true
		}
	}
	return p
}

// status shows line as the live status.
func (p *printer) status(line string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.tty {
		fmt.Fprint(p.w, "\r"+line+"\x1b[K")
		p.live = true
		return
	}
	fmt.Fprintln(p.w, line)
}

// endStatus leaves the last status line on screen.
func (p *printer) endStatus() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.live {
		fmt.Fprintln(p.w)
		p.live = false
	}
}

// linef prints a line of text.
func (p *printer) linef(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.live {
		fmt.Fprint(p.w, "\r\x1b[K")
		p.live = false
	}
	fmt.Fprintf(p.w, format+"\n", args...)
}

// event prints a line about something that happened; on a terminal it
// replaces the status line, which the next status redraws below it.
func (p *printer) event(format string, args ...any) {
	p.linef("  ! "+format, args...)
}

// plural is "1 row", "2 rows".
func plural(n int, noun string) string {
	if n == 1 {
		return "1 " + noun
	}
	return fmt.Sprintf("%d %ss", n, noun)
}
