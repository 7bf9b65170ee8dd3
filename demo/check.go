package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/txn"
)

// Transfer is the value of one "payments" event.
type Transfer struct {
	TransferID int64 `json:"transfer_id"`
	From       int   `json:"from"`
	To         int   `json:"to"`
	Amount     int64 `json:"amount"`
	// Seq counts the transfers debited from From, 1, 2, 3, ...: it is
	// incremented in the same database transaction, under the row lock, so
	// the events of one account (one key) must arrive with seq 1, 2, 3, ...
	Seq int64 `json:"seq"`
}

// checker compares what the writers committed with what a read_committed
// consumer sees: every outbox row exactly once (by its "outbox-id" header),
// every committed transfer, nothing else, and per account (key) seq 1, 2, 3,
// ... on one partition.
type checker struct {
	mu         sync.Mutex
	written    int64
	pending    map[int64]time.Time // committed, not yet consumed: transfer id → commit time
	early      map[int64]bool      // consumed before its writer saw its commit return
	outboxIDs  bitset
	transfers  bitset
	keys       map[string]*keyState
	verified   int64
	duplicates int64
	outOfOrder int64
	unexpected int64
	problems   []string
}

type keyState struct {
	seq       int64
	partition int32
}

// maxProblems is how many problem descriptions the summary shows.
const maxProblems = 10

func newChecker() *checker {
	return &checker{pending: map[int64]time.Time{}, early: map[int64]bool{}, keys: map[string]*keyState{}}
}

func (c *checker) problem(format string, args ...any) {
	if len(c.problems) < maxProblems {
		c.problems = append(c.problems, fmt.Sprintf(format, args...))
	}
}

// committed records that transfer id's database transaction committed.
func (c *checker) committed(id int64, at time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.written++
	if c.early[id] {
		delete(c.early, id)
		return
	}
	c.pending[id] = at
}

// record checks one consumed record.
func (c *checker) record(r *kgo.Record) {
	c.mu.Lock()
	defer c.mu.Unlock()
	id := int64(-1)
	for _, h := range r.Headers {
		if h.Key == txn.HeaderOutboxID {
			id, _ = strconv.ParseInt(string(h.Value), 10, 64)
		}
	}
	if !validID(id) {
		c.unexpected++
		c.problem("partition %d offset %d: no valid %s header", r.Partition, r.Offset, txn.HeaderOutboxID)
		return
	}
	if c.outboxIDs.has(id) {
		c.duplicates++
		c.problem("outbox row %d delivered again (partition %d offset %d)", id, r.Partition, r.Offset)
		return
	}
	c.outboxIDs.set(id)
	var t Transfer
	if err := json.Unmarshal(r.Value, &t); err != nil || !validID(t.TransferID) {
		c.unexpected++
		c.problem("outbox row %d: value is not a transfer: %.80q", id, r.Value)
		return
	}
	if c.transfers.has(t.TransferID) {
		c.duplicates++
		c.problem("transfer %d delivered again, as outbox row %d", t.TransferID, id)
		return
	}
	c.transfers.set(t.TransferID)
	c.verified++
	if _, ok := c.pending[t.TransferID]; ok {
		delete(c.pending, t.TransferID)
	} else {
		c.early[t.TransferID] = true
	}

	key := string(r.Key)
	if key != strconv.Itoa(t.From) {
		c.unexpected++
		c.problem("outbox row %d: key %q but the transfer debits account %d", id, key, t.From)
	}
	ks := c.keys[key]
	if ks == nil {
		ks = &keyState{partition: r.Partition}
		c.keys[key] = ks
	}
	if r.Partition != ks.partition {
		c.outOfOrder++
		c.problem("account %s: event seq %d on partition %d, earlier events on partition %d", key, t.Seq, r.Partition, ks.partition)
	}
	if t.Seq != ks.seq+1 {
		c.outOfOrder++
		c.problem("account %s: event seq %d arrived after seq %d", key, t.Seq, ks.seq)
	}
	ks.seq = max(ks.seq, t.Seq)
}

// validID bounds ids, so that a foreign record on an external cluster cannot
// make the bitsets huge (at most 32 MiB each).
func validID(id int64) bool { return id > 0 && id < 1<<28 }

// counts is a consistent snapshot of the checker.
type counts struct {
	written, verified, duplicates, outOfOrder, unexpected int64
	// missing: committed, not consumed, and committed more than the grace
	// period ago (all of them in the final count).
	missing int64
	// missingIDs are the first missing transfer ids; early are consumed
	// transfers no writer reported committed (final count only).
	missingIDs []int64
	early      int64
	problems   []string
}

// snapshot counts as of now; a transfer counts as missing once it was
// committed more than grace ago and is still not consumed.
func (c *checker) snapshot(grace time.Duration) counts {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := counts{written: c.written, verified: c.verified, duplicates: c.duplicates, outOfOrder: c.outOfOrder,
		unexpected: c.unexpected, early: int64(len(c.early)), problems: slices.Clone(c.problems)}
	cutoff := time.Now().Add(-grace)
	for id, at := range c.pending {
		if at.Before(cutoff) {
			s.missing++
			s.missingIDs = append(s.missingIDs, id)
		}
	}
	slices.Sort(s.missingIDs)
	s.missingIDs = s.missingIDs[:min(len(s.missingIDs), maxProblems)]
	return s
}

// caughtUp reports whether every committed transfer has been consumed.
func (c *checker) caughtUp() (written int64, ok bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.written, len(c.pending) == 0
}

// bitset is a set of small positive integers; outbox and transfer ids of one
// demo run are dense from 1.
type bitset []uint64

func (b *bitset) set(i int64) {
	w := int(i >> 6)
	for len(*b) <= w {
		*b = append(*b, 0)
	}
	(*b)[w] |= 1 << (i & 63)
}

func (b bitset) has(i int64) bool {
	w := int(i >> 6)
	return w < len(b) && b[w]&(1<<(i&63)) != 0
}

// consume feeds every record of cl to check until ctx ends.
func consume(ctx context.Context, cl *kgo.Client, check *checker, log *slog.Logger) {
	for {
		fs := cl.PollFetches(ctx)
		fs.EachRecord(check.record)
		if ctx.Err() != nil || fs.IsClientClosed() {
			return
		}
		fs.EachError(func(topic string, p int32, err error) {
			log.Warn("demo consumer: fetch failed, retrying", "topic", topic, "partition", p, "err", err)
		})
	}
}
