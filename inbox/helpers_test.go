package inbox_test

import (
	"context"
	"fmt"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// env is one test's PostgreSQL database (inbox tables migrated, plus an
// effects table the test handlers write) and Kafka topic.
type env struct {
	pool  *pgxpool.Pool
	k     *testenv.Kafka
	topic string
	group string
}

func newEnv(t *testing.T, partitions int32) *env {
	t.Helper()
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	m, err := inbox.NewMigrator(pool, "public", "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		t.Fatalf("migrate the inbox: %v", err)
	}
	// effects has no key on purpose: an event applied twice shows as two
	// rows.
	if _, err := pool.Exec(ctx, `CREATE TABLE effects (outbox_id bigint NOT NULL, kafka_offset bigint NOT NULL, attempt int NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	topic := testenv.RandomName("inbox-")
	return &env{pool: pool, k: testenv.NewKafka(t, partitions, topic), topic: topic, group: testenv.RandomName("group-")}
}

// config is a test configuration: small batches, quick retries, fast
// group heartbeats.
func (e *env) config() inbox.Config {
	return inbox.Config{
		Brokers:         e.k.Brokers,
		Group:           e.group,
		Topics:          []string{e.topic},
		BatchSize:       20,
		RetryBackoff:    5 * time.Millisecond,
		MaxRetryBackoff: 20 * time.Millisecond,
		CommitInterval:  200 * time.Millisecond,
		KafkaOptions: []kgo.Opt{
			kgo.HeartbeatInterval(250 * time.Millisecond),
			kgo.FetchMaxWait(200 * time.Millisecond),
		},
	}
}

// record writes one effects row per application: the handler every test
// uses unless it needs another.
func record(ctx context.Context, tx pgx.Tx, ev *inbox.Event) error {
	_, err := tx.Exec(ctx, `INSERT INTO effects (outbox_id, kafka_offset, attempt) VALUES ($1, $2, $3)`, ev.OutboxID, ev.Offset, ev.Attempt)
	return err
}

// running is an Inbox running in a goroutine.
type running struct {
	in     *inbox.Inbox
	cancel context.CancelFunc
	done   chan struct{}
	err    error
	once   sync.Once
}

func start(t *testing.T, e *env, cfg inbox.Config, h inbox.Handler, opts ...inbox.Option) *running {
	t.Helper()
	opts = append([]inbox.Option{inbox.WithLogger(testenv.Logger(t, nil))}, opts...)
	in, err := inbox.New(cfg, e.pool, h, opts...)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{in: in, cancel: cancel, done: make(chan struct{})}
	go func() {
		defer close(r.done)
		r.err = in.Run(ctx)
	}()
	t.Cleanup(func() { r.stop() })
	return r
}

// stop cancels Run and returns its error.
func (r *running) stop() error {
	r.once.Do(func() {
		r.cancel()
		<-r.done
	})
	return r.err
}

// wait returns Run's error once it stops on its own, failing the test
// after timeout.
func (r *running) wait(t *testing.T, timeout time.Duration) error {
	t.Helper()
	select {
	case <-r.done:
		return r.err
	case <-time.After(timeout):
		t.Fatalf("the inbox did not stop within %v", timeout)
		return nil
	}
}

// producer writes records with outbox-id headers in Kafka transactions.
type producer struct {
	cl    *kgo.Client
	topic string
}

func (e *env) producer(t *testing.T) *producer {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.k.Brokers...), kgo.DefaultProduceTopic(e.topic),
		kgo.TransactionalID(testenv.RandomName("inbox-test-")), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(cl.Close)
	return &producer{cl: cl, topic: e.topic}
}

// rec is a record of outbox row id on partition p; header, when not nil,
// replaces the outbox-id header's value.
func rec(id int64, p int32) *kgo.Record {
	return &kgo.Record{Partition: p, Key: []byte("k" + strconv.FormatInt(id%7, 10)), Value: fmt.Appendf(nil, `{"id":%d}`, id),
		Headers: []kgo.RecordHeader{{Key: inbox.HeaderOutboxID, Value: []byte(strconv.FormatInt(id, 10))}}}
}

// send produces recs in one transaction, committed or aborted.
func (p *producer) send(t *testing.T, commit bool, recs ...*kgo.Record) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := p.cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	for _, r := range recs {
		if r.Topic == "" {
			r.Topic = p.topic
		}
		p.cl.Produce(ctx, r, nil)
	}
	if err := p.cl.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if err := p.cl.EndTransaction(ctx, kgo.TransactionEndTry(commit)); err != nil {
		t.Fatal(err)
	}
}

// sendIDs produces ids from..to (inclusive), spread over partitions, in
// committed transactions of up to 50 records.
func (p *producer) sendIDs(t *testing.T, from, to int64, partitions int32) {
	t.Helper()
	for lo := from; lo <= to; lo += 50 {
		var recs []*kgo.Record
		for id := lo; id <= min(to, lo+49); id++ {
			recs = append(recs, rec(id, int32(id%int64(partitions))))
		}
		p.send(t, true, recs...)
	}
}

// applications counts effects rows per outbox id.
func (e *env) applications(t *testing.T) map[int64]int {
	t.Helper()
	rows, err := e.pool.Query(context.Background(), `SELECT outbox_id, count(*) FROM effects GROUP BY outbox_id`)
	if err != nil {
		t.Fatal(err)
	}
	out := map[int64]int{}
	for rows.Next() {
		var id int64
		var n int
		if err := rows.Scan(&id, &n); err != nil {
			t.Fatal(err)
		}
		out[id] = n
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	return out
}

func (e *env) count(t *testing.T, query string, args ...any) int64 {
	t.Helper()
	var n int64
	if err := e.pool.QueryRow(context.Background(), query, args...).Scan(&n); err != nil {
		t.Fatalf("%s: %v", query, err)
	}
	return n
}

// waitFor polls cond until it holds or fails the test after timeout.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v", what, timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// checkExactlyOnce fails the test unless every id in want was applied
// exactly once, nothing else was applied, and the applied table lists each
// once.
func (e *env) checkExactlyOnce(t *testing.T, want []int64) {
	t.Helper()
	got := e.applications(t)
	var missing, twice, extra []int64
	for _, id := range want {
		switch got[id] {
		case 0:
			missing = append(missing, id)
		case 1:
		default:
			twice = append(twice, id)
		}
		delete(got, id)
	}
	for id := range got {
		extra = append(extra, id)
	}
	if len(missing)+len(twice)+len(extra) > 0 {
		t.Fatalf("exactly-once broken: %d missing %v, %d applied more than once %v, %d unexpected %v",
			len(missing), head(missing), len(twice), head(twice), len(extra), head(extra))
	}
	if n := e.count(t, `SELECT count(*) FROM inbox_applied WHERE topic = $1`, e.topic); n != int64(len(want)) {
		t.Fatalf("inbox_applied lists %d events, want %d", n, len(want))
	}
}

func head(ids []int64) []int64 {
	if len(ids) > 20 {
		return ids[:20]
	}
	return ids
}

func ids(from, to int64) []int64 {
	var out []int64
	for id := from; id <= to; id++ {
		out = append(out, id)
	}
	return out
}
