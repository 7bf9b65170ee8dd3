package faultproxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/txn"
)

// API keys used by the tests.
const (
	apiProduce         int16 = 0
	apiFetch           int16 = 1
	apiMetadata        int16 = 3
	apiFindCoordinator int16 = 10
	apiEndTxn          int16 = 26
)

const testTimeout = 90 * time.Second

// testCluster is the cluster a test runs against: an in-process kfake
// cluster, or the real cluster named by KAFKA_BROKERS.
type testCluster struct {
	seeds    []string // upstream broker addresses, reached directly
	topic    string
	nBrokers int // number of brokers, or 0 if unknown (real cluster)
}

// newTestCluster starts a 3-broker kfake cluster with a 3-partition topic
// "t", or, if KAFKA_BROKERS is set (comma-separated host:port list), creates
// a fresh 3-partition topic on that cluster via kadm and deletes it when the
// test ends.
func newTestCluster(t *testing.T) testCluster {
	t.Helper()
	if env := os.Getenv("KAFKA_BROKERS"); env != "" {
		var seeds []string
		for s := range strings.SplitSeq(env, ",") {
			if s = strings.TrimSpace(s); s != "" {
				seeds = append(seeds, s)
			}
		}
		topic := fmt.Sprintf("faultproxy-%s-%d", strings.ReplaceAll(t.Name(), "/", "-"), time.Now().UnixNano())
		adm, err := kgo.NewClient(kgo.SeedBrokers(seeds...))
		if err != nil {
			t.Fatalf("admin client for %v: %v", seeds, err)
		}
		t.Cleanup(adm.Close)
		ac := kadm.NewClient(adm)
		ctx, cancel := context.WithTimeout(t.Context(), 30*time.Second)
		defer cancel()
		if _, err := ac.CreateTopic(ctx, 3, -1, nil, topic); err != nil {
			t.Fatalf("creating topic %s: %v", topic, err)
		}
		t.Cleanup(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if _, err := ac.DeleteTopic(ctx, topic); err != nil {
				t.Logf("deleting topic %s: %v", topic, err)
			}
		})
		return testCluster{seeds: seeds, topic: topic}
	}
	c, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.SeedTopics(3, "t"))
	if err != nil {
		t.Fatalf("starting kfake cluster: %v", err)
	}
	t.Cleanup(c.Close)
	return testCluster{seeds: c.ListenAddrs(), topic: "t", nBrokers: 3}
}

// testLogger logs to the test's output.
func testLogger(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelInfo}))
}

func newProxy(t *testing.T, seeds []string) *Proxy {
	t.Helper()
	// Not t.Context(): it is canceled before cleanups run, and the proxy
	// must outlive the clients, which are closed by later-registered (so
	// earlier-run) cleanups.
	p, err := New(context.Background(), testLogger(t).With("component", "faultproxy"), seeds...)
	if err != nil {
		t.Fatalf("starting proxy: %v", err)
	}
	t.Cleanup(p.Close)
	return p
}

func newClient(t *testing.T, name string, opts ...kgo.Opt) *kgo.Client {
	t.Helper()
	opts = append([]kgo.Opt{kgo.WithLogger(txn.KafkaLogger(testLogger(t).With("client", name), kgo.LogLevelInfo))}, opts...)
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		t.Fatalf("creating %s client: %v", name, err)
	}
	t.Cleanup(cl.Close)
	return cl
}

// valuePrefix returns a prefix unique to this test run, so that records of
// earlier runs against a real cluster are never counted.
func valuePrefix(t *testing.T) string {
	return fmt.Sprintf("%s-%d-", t.Name(), time.Now().UnixNano())
}

func makeRecords(topic, prefix string, n int) []*kgo.Record {
	recs := make([]*kgo.Record, n)
	for i := range recs {
		recs[i] = &kgo.Record{
			Topic: topic,
			Key:   []byte(strconv.Itoa(i)),
			Value: []byte(prefix + strconv.Itoa(i)),
		}
	}
	return recs
}

// consumeValues reads topic from the start with a fresh client connected
// directly to seeds (bypassing any proxy) and returns how often each value
// with prefix was seen. It stops once want matching records have arrived and
// a further quiet period has passed without any new matching record, so
// duplicates written next to the originals are counted too.
func consumeValues(t *testing.T, ctx context.Context, seeds []string, topic, prefix string, want int, opts ...kgo.Opt) map[string]int {
	t.Helper()
	opts = append([]kgo.Opt{
		kgo.SeedBrokers(seeds...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	}, opts...)
	cl := newClient(t, "direct-consumer", opts...)
	defer cl.Close()

	counts := make(map[string]int)
	total := 0
	const quiet = time.Second
	var quietSince time.Time
	for {
		pollCtx, cancel := context.WithTimeout(ctx, 250*time.Millisecond)
		fs := cl.PollFetches(pollCtx)
		cancel()
		if ctx.Err() != nil {
			t.Fatalf("consuming %s: got %d of %d records before %v", topic, total, want, ctx.Err())
		}
		for _, fe := range fs.Errors() {
			if !errors.Is(fe.Err, context.DeadlineExceeded) {
				t.Fatalf("fetching %s[%d]: %v", fe.Topic, fe.Partition, fe.Err)
			}
		}
		got := 0
		fs.EachRecord(func(r *kgo.Record) {
			if v := string(r.Value); strings.HasPrefix(v, prefix) {
				counts[v]++
				got++
			}
		})
		total += got
		switch {
		case total < want:
		case got > 0 || quietSince.IsZero():
			quietSince = time.Now()
		case time.Since(quietSince) >= quiet:
			return counts
		}
	}
}

// assertExactlyOnce checks that every value prefix0..prefix(n-1) was seen
// exactly once and nothing else was seen.
func assertExactlyOnce(t *testing.T, counts map[string]int, prefix string, n int) {
	t.Helper()
	if len(counts) != n {
		t.Errorf("saw %d distinct values, want %d", len(counts), n)
	}
	for i := range n {
		if v := prefix + strconv.Itoa(i); counts[v] != 1 {
			t.Errorf("value %q seen %d times, want exactly once", v, counts[v])
		}
	}
}

// TestProxyProduceConsume proves that a plain client seeded with a single
// proxy address keeps all of its traffic on the proxy: Metadata,
// FindCoordinator and DescribeCluster responses are rewritten, listeners for
// the other brokers are opened on demand, and records round-trip.
func TestProxyProduceConsume(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()

	// Only the first broker is a seed: the others must be discovered from
	// rewritten Metadata responses.
	p := newProxy(t, tc.seeds[:1])
	prefix := valuePrefix(t)
	const n = 30

	cl := newClient(t, "proxied",
		kgo.SeedBrokers(p.Addrs()...),
		kgo.ConsumeTopics(tc.topic),
		kgo.ConsumerGroup("faultproxy-"+strings.TrimSuffix(prefix, "-")),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
	)
	if err := cl.ProduceSync(ctx, makeRecords(tc.topic, prefix, n)...).FirstErr(); err != nil {
		t.Fatalf("producing through proxy: %v", err)
	}

	counts := make(map[string]int)
	for len(counts) < n {
		fs := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("consuming through proxy: got %d of %d records: %v", len(counts), n, ctx.Err())
		}
		if err := fs.Err0(); err != nil {
			t.Fatalf("consuming through proxy: %v", err)
		}
		fs.EachRecord(func(r *kgo.Record) {
			if v := string(r.Value); strings.HasPrefix(v, prefix) {
				counts[v]++
			}
		})
	}
	assertExactlyOnce(t, counts, prefix, n)

	// Every broker the client learned about must be a proxy listener.
	routes := p.Routes()
	local := make(map[string]bool, len(routes))
	for _, l := range routes {
		local[l] = true
	}
	md, err := kadm.NewClient(cl).BrokerMetadata(ctx)
	if err != nil {
		t.Fatalf("metadata through proxy: %v", err)
	}
	for _, b := range md.Brokers {
		if addr := net.JoinHostPort(b.Host, strconv.Itoa(int(b.Port))); !local[addr] {
			t.Errorf("Metadata broker %d advertised as %s, which is not a proxy listener (routes %v)", b.NodeID, addr, routes)
		}
	}
	if tc.nBrokers > 0 && len(md.Brokers) != tc.nBrokers {
		t.Errorf("Metadata lists %d brokers, want %d", len(md.Brokers), tc.nBrokers)
	}
	if len(routes) < len(md.Brokers) {
		t.Errorf("proxy has %d routes for %d brokers: %v", len(routes), len(md.Brokers), routes)
	}

	// DescribeCluster responses are rewritten the same way.
	dc, err := kmsg.NewPtrDescribeClusterRequest().RequestWith(ctx, cl)
	if err != nil {
		t.Fatalf("DescribeCluster through proxy: %v", err)
	}
	if err := kerr.ErrorForCode(dc.ErrorCode); err != nil {
		t.Fatalf("DescribeCluster through proxy: %v", err)
	}
	for _, b := range dc.Brokers {
		if addr := net.JoinHostPort(b.Host, strconv.Itoa(int(b.Port))); !local[addr] {
			t.Errorf("DescribeCluster broker %d advertised as %s, which is not a proxy listener", b.NodeID, addr)
		}
	}

	for _, k := range []int16{apiMetadata, apiProduce, apiFetch, apiFindCoordinator} {
		if p.Seen(k) == 0 {
			t.Errorf("Seen(%s) = 0, want > 0", kmsg.NameForKey(k))
		}
	}
	for _, k := range []int16{apiMetadata, apiProduce, apiFetch, apiFindCoordinator} {
		if p.Fired(k) != 0 {
			t.Errorf("Fired(%s) = %d without any armed rule", kmsg.NameForKey(k), p.Fired(k))
		}
	}
	t.Logf("routes %v; seen: Metadata=%d FindCoordinator=%d Produce=%d Fetch=%d",
		routes, p.Seen(apiMetadata), p.Seen(apiFindCoordinator), p.Seen(apiProduce), p.Seen(apiFetch))
}

// TestLostEndTxnResponse drops the response to a committing EndTxn: the
// broker commits, the client never hears about it.
//
// What kgo v1.22.3 does (observed against kfake, EndTxn v5): reading the
// EndTxn response fails with io.EOF ("read from broker errored, killing
// connection"), which kgo's retryable coordinator request path treats as a
// retryable connection error ("retrying request" request=EndTxn tries=1
// request_error=EOF). After the retry backoff it re-sends the same
// EndTxn(commit) at the same producer id/epoch on a new connection. kfake
// (like Kafka with KIP-890 EndTxn v5) recognises it as a retry of the commit
// that already completed -- the epoch was bumped by exactly one and the last
// outcome was a commit -- and answers success with the bumped epoch, so
// EndTransaction(ctx, TryCommit) returns nil, kgo adopts epoch+1, and the
// proxy sees two EndTxn requests. The unconfirmed-outcome error path of
// EndTransaction is therefore not reached for a single lost response. If a
// kgo or broker version did surface the unconfirmed outcome as an error, the
// documented recovery is EndTransaction(ctx, TryAbort), and this test
// follows it; either way the records must be committed exactly once.
func TestLostEndTxnResponse(t *testing.T) {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	p := newProxy(t, tc.seeds)
	prefix := valuePrefix(t)
	const n = 10

	prod := newClient(t, "txn-producer",
		kgo.SeedBrokers(p.Addrs()...),
		kgo.TransactionalID("faultproxy-txn-"+strings.TrimSuffix(prefix, "-")),
	)
	if err := prod.BeginTransaction(); err != nil {
		t.Fatalf("BeginTransaction: %v", err)
	}
	if err := prod.ProduceSync(ctx, makeRecords(tc.topic, prefix, n)...).FirstErr(); err != nil {
		t.Fatalf("producing in transaction: %v", err)
	}
	if err := prod.Flush(ctx); err != nil {
		t.Fatalf("Flush: %v", err)
	}

	// Hold the dropped response in the proxy until the test has checked
	// the broker side: while onDrop blocks, the client has no outcome, so
	// whatever the broker shows then was done by the dropped request alone.
	dropped := make(chan Drop, 1)
	release := make(chan struct{})
	p.DropResponses(apiEndTxn, 1, func(d Drop) {
		dropped <- d
		select {
		case <-release:
		case <-ctx.Done():
		}
	})
	endErr := make(chan error, 1)
	go func() { endErr <- prod.EndTransaction(ctx, kgo.TryCommit) }()

	var d Drop
	select {
	case d = <-dropped:
	case err := <-endErr:
		t.Fatalf("EndTransaction returned %v before the EndTxn response was dropped", err)
	case <-ctx.Done():
		t.Fatalf("EndTxn response never dropped (seen %d EndTxn): %v", p.Seen(apiEndTxn), ctx.Err())
	}
	resp, ok := d.Response.(*kmsg.EndTxnResponse)
	if !ok {
		close(release)
		t.Fatalf("dropped response is %T (decode error %v), want *kmsg.EndTxnResponse", d.Response, d.DecodeErr)
	}
	if err := kerr.ErrorForCode(resp.ErrorCode); err != nil {
		close(release)
		t.Fatalf("broker answered the dropped EndTxn with %v; the commit was not applied", err)
	}
	// The broker said "committed"; a read_committed consumer that bypasses
	// the proxy must already see every record, before the client got any
	// answer.
	committed := consumeValues(t, ctx, tc.seeds, tc.topic, prefix, n, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	close(release)
	assertExactlyOnce(t, committed, prefix, n)
	if got := p.Fired(apiEndTxn); got != 1 {
		t.Errorf("Fired(EndTxn) = %d, want 1", got)
	}

	err := <-endErr
	t.Logf("EndTransaction(TryCommit) after lost EndTxn v%d response: err=%v; EndTxn requests seen by proxy: %d",
		d.APIVersion, err, p.Seen(apiEndTxn))
	if err != nil {
		// The documented path for an unconfirmed commit: retry with
		// TryAbort, which reloads the producer id instead of aborting
		// a transaction that may already be committed.
		if abortErr := prod.EndTransaction(ctx, kgo.TryAbort); abortErr != nil {
			t.Fatalf("EndTransaction(TryAbort) after unconfirmed commit (%v): %v", err, abortErr)
		}
	} else if seen := p.Seen(apiEndTxn); seen < 2 {
		t.Errorf("EndTransaction succeeded with only %d EndTxn request(s) seen; expected a retry after the dropped response", seen)
	}

	// The producer must be usable for a next transaction, and the first
	// transaction's records must still be committed exactly once.
	prefix2 := prefix + "next-"
	if err := prod.BeginTransaction(); err != nil {
		t.Fatalf("BeginTransaction after lost EndTxn response: %v", err)
	}
	if err := prod.ProduceSync(ctx, makeRecords(tc.topic, prefix2, n)...).FirstErr(); err != nil {
		t.Fatalf("producing in second transaction: %v", err)
	}
	if err := prod.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatalf("committing second transaction: %v", err)
	}
	all := consumeValues(t, ctx, tc.seeds, tc.topic, prefix, 2*n, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	first := make(map[string]int)
	second := make(map[string]int)
	for v, c := range all {
		if strings.HasPrefix(v, prefix2) {
			second[v] = c
		} else {
			first[v] = c
		}
	}
	assertExactlyOnce(t, first, prefix, n)
	assertExactlyOnce(t, second, prefix2, n)
}

// lostAckResult is what lostAck observed.
type lostAckResult struct {
	prefix string
	n      int
	counts map[string]int // value -> times a direct consumer saw it
	// dropped maps each partition acknowledged by the dropped Produce
	// response to the base offset the broker had assigned.
	dropped map[int32]int64
	// firstOffset maps each partition to the lowest offset the client was
	// finally told for its records.
	firstOffset map[int32]int64
}

// lostAck produces records through a proxy whose first Produce response is
// dropped, checks that the fault fired on an applied write and was retried,
// and consumes the topic directly.
func lostAck(t *testing.T, opts ...kgo.Opt) lostAckResult {
	tc := newTestCluster(t)
	ctx, cancel := context.WithTimeout(t.Context(), testTimeout)
	defer cancel()
	p := newProxy(t, tc.seeds)
	res := lostAckResult{
		prefix:      valuePrefix(t),
		n:           20,
		dropped:     make(map[int32]int64),
		firstOffset: make(map[int32]int64),
	}

	var mu sync.Mutex // guards res.dropped, written by the proxy goroutine
	p.DropResponses(apiProduce, 1, func(d Drop) {
		mu.Lock()
		defer mu.Unlock()
		resp, ok := d.Response.(*kmsg.ProduceResponse)
		if !ok {
			return
		}
		for _, rt := range resp.Topics {
			for _, rp := range rt.Partitions {
				if rp.ErrorCode == 0 {
					res.dropped[rp.Partition] = rp.BaseOffset
				}
			}
		}
	})
	// After a failed produce request kgo refreshes metadata before
	// retrying; a short MetadataMinAge keeps that from waiting the default
	// 5s.
	cl := newClient(t, "producer", append([]kgo.Opt{
		kgo.SeedBrokers(p.Addrs()...),
		kgo.MetadataMinAge(100 * time.Millisecond),
	}, opts...)...)
	results := cl.ProduceSync(ctx, makeRecords(tc.topic, res.prefix, res.n)...)
	if err := results.FirstErr(); err != nil {
		t.Fatalf("ProduceSync after lost Produce response: %v", err)
	}
	for _, r := range results {
		if o, ok := res.firstOffset[r.Record.Partition]; !ok || r.Record.Offset < o {
			res.firstOffset[r.Record.Partition] = r.Record.Offset
		}
	}
	if got := p.Fired(apiProduce); got != 1 {
		t.Fatalf("Fired(Produce) = %d, want 1", got)
	}
	mu.Lock()
	t.Logf("dropped Produce response acknowledged partition->base offset %v; client got first offsets %v; Produce requests seen by proxy: %d",
		res.dropped, res.firstOffset, p.Seen(apiProduce))
	if len(res.dropped) == 0 {
		t.Fatalf("dropped Produce response acknowledged no partition without error: the write was not applied")
	}
	mu.Unlock()
	if seen := p.Seen(apiProduce); seen < 2 {
		t.Errorf("Seen(Produce) = %d, want a retry (>= 2)", seen)
	}
	res.counts = consumeValues(t, ctx, tc.seeds, tc.topic, res.prefix, res.n)
	return res
}

// TestLostProduceResponse drops the response to a Produce request: the
// broker appends the batch, the client never gets the ack and retries.
//
// What kgo v1.22.3 does (observed against kfake): the read of the Produce
// response fails with io.EOF; because it was the first request on that
// connection kgo logs "read from broker errored, killing connection after 0
// successful responses (is SASL missing?)" and the sink treats it as
// "broker closed the connection immediately after a request was issued ...",
// requeues the batch ("requeueing unattempted request"), rewinds the
// partition's produce sequence to the unacknowledged batch, triggers a
// metadata refresh and re-sends the same batch. ProduceSync returns no
// error. With idempotence (kgo's default) the re-sent batch has the same
// producer id, epoch and sequence, so the broker answers it as a duplicate
// with the original base offset; without idempotence it is appended again.
func TestLostProduceResponse(t *testing.T) {
	t.Run("idempotent", func(t *testing.T) {
		res := lostAck(t)
		assertExactlyOnce(t, res.counts, res.prefix, res.n)
		for part, base := range res.dropped {
			if got := res.firstOffset[part]; got != base {
				t.Errorf("partition %d: client was told offset %d, want the dropped ack's base offset %d (duplicate detection)", part, got, base)
			}
		}
	})

	t.Run("non-idempotent-control", func(t *testing.T) {
		// The same fault without idempotence writes the dropped batch
		// twice: proof that the retry after the lost ack really happens
		// and that exactly-once above is the broker deduplicating.
		res := lostAck(t, kgo.DisableIdempotentWrite())
		var dups []string
		for i := range res.n {
			v := res.prefix + strconv.Itoa(i)
			switch c := res.counts[v]; {
			case c == 0:
				t.Errorf("value %q lost", v)
			case c > 1:
				dups = append(dups, v)
			}
		}
		slices.Sort(dups)
		t.Logf("%d values duplicated by the retry: %v", len(dups), dups)
		if len(dups) == 0 {
			t.Errorf("no duplicates without idempotence; the dropped produce was not applied-and-retried")
		}
		for part, base := range res.dropped {
			if got := res.firstOffset[part]; got <= base {
				t.Errorf("partition %d: client was told offset %d, want past the dropped batch at %d (re-appended)", part, got, base)
			}
		}
	})
}
