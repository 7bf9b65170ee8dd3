// Package testenv gives integration tests their real parts: a fresh
// PostgreSQL database per test package on the server of TEST_DATABASE_URL
// (default postgres://postgres@127.0.0.1:5432/postgres), migrated, and a
// Kafka-protocol cluster over TCP: an in-process kfake cluster, or the real
// cluster named by KAFKA_BROKERS when it is set.
//
// Tests fail, never skip, when PostgreSQL is unreachable.
package testenv

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"net/url"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// DefaultServerURL is the PostgreSQL server tests use when
// TEST_DATABASE_URL is not set.
const DefaultServerURL = "postgres://postgres@127.0.0.1:5432/postgres"

// ServerURL is the URL of the server tests create their databases on.
func ServerURL() string {
	if u := os.Getenv("TEST_DATABASE_URL"); u != "" {
		return u
	}
	return DefaultServerURL
}

// RandomName returns prefix followed by 8 random hex digits.
func RandomName(prefix string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return prefix + hex.EncodeToString(b[:])
}

// CreateDatabase creates a fresh database and returns its URL and a function
// that drops it. It fails the test (never skips) when the server is down.
func CreateDatabase(tb testing.TB) string {
	tb.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	server := ServerURL()
	conn, err := pgx.Connect(ctx, server)
	if err != nil {
		tb.Fatalf("PostgreSQL at %s is unreachable (start it, or set TEST_DATABASE_URL): %v", server, err)
	}
	defer conn.Close(context.Background())
	name := RandomName("outbox_test_")
	if _, err := conn.Exec(ctx, "CREATE DATABASE "+name); err != nil {
		tb.Fatalf("create database %s: %v", name, err)
	}
	tb.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		c, err := pgx.Connect(ctx, server)
		if err != nil {
			return
		}
		defer c.Close(ctx)
		_, _ = c.Exec(ctx, "DROP DATABASE IF EXISTS "+name+" WITH (FORCE)")
	})
	u, err := url.Parse(server)
	if err != nil {
		tb.Fatalf("TEST_DATABASE_URL: %v", err)
	}
	u.Path = "/" + name
	return u.String()
}

// DB is a migrated outbox database.
type DB struct {
	URL   string
	Pool  *pgxpool.Pool
	Table outbox.Table
}

// NewDB creates a fresh database, migrates the outbox table into schema
// "public", table "outbox", and returns a pool on it.
func NewDB(tb testing.TB) *DB {
	tb.Helper()
	dbURL := CreateDatabase(tb)
	ctx := context.Background()
	pool, err := pgxpool.New(ctx, dbURL)
	if err != nil {
		tb.Fatalf("pool: %v", err)
	}
	tb.Cleanup(pool.Close)
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		tb.Fatal(err)
	}
	if _, err := m.Up(ctx); err != nil {
		tb.Fatalf("migrate: %v", err)
	}
	return &DB{URL: dbURL, Pool: pool, Table: outbox.DefaultTable}
}

// Insert writes n rows of topic in one transaction, keys cycling over keys
// (nil: keyless), and returns their ids in order. It is safe while other
// writers insert too.
func (d *DB) Insert(tb testing.TB, topic string, n int, keys []string) []int64 {
	tb.Helper()
	keyCol := make([][]byte, n)
	values := make([][]byte, n)
	for i := range n {
		values[i] = []byte("v" + strconv.Itoa(i))
		if len(keys) > 0 {
			keyCol[i] = []byte(keys[i%len(keys)])
		}
	}
	rows, err := d.Pool.Query(context.Background(), `INSERT INTO `+d.Table.Ident()+` (topic, key, value)
SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) WITH ORDINALITY AS u(k, v, n) ORDER BY n RETURNING id`, topic, keyCol, values)
	if err != nil {
		tb.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		tb.Fatal(err)
	}
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	return ids
}

// Unpublished counts rows not yet marked published.
func (d *DB) Unpublished(tb testing.TB) int {
	tb.Helper()
	var n int
	if err := d.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE published_at IS NULL`).Scan(&n); err != nil {
		tb.Fatal(err)
	}
	return n
}

// Kafka is a Kafka-protocol cluster reachable over TCP.
type Kafka struct {
	Brokers []string
	// Cluster is the in-process kfake cluster, nil against a real cluster.
	Cluster *kfake.Cluster
	Real    bool
}

// RealBrokers returns KAFKA_BROKERS split, or nil.
func RealBrokers() []string {
	v := os.Getenv("KAFKA_BROKERS")
	if v == "" {
		return nil
	}
	return strings.Split(v, ",")
}

// NewKafka starts a 3-broker kfake cluster (or uses KAFKA_BROKERS) and
// creates the given topics with partitions partitions each.
func NewKafka(tb testing.TB, partitions int32, topics ...string) *Kafka {
	tb.Helper()
	k := &Kafka{}
	if b := RealBrokers(); b != nil {
		k.Brokers, k.Real = b, true
	} else {
		c, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.DefaultNumPartitions(int(partitions)))
		if err != nil {
			tb.Fatalf("kfake: %v", err)
		}
		tb.Cleanup(c.Close)
		k.Cluster, k.Brokers = c, c.ListenAddrs()
	}
	if len(topics) > 0 {
		k.CreateTopics(tb, partitions, topics...)
	}
	return k
}

// Admin returns an admin client, closed with the test.
func (k *Kafka) Admin(tb testing.TB) *kadm.Client {
	tb.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...))
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(cl.Close)
	return kadm.NewClient(cl)
}

// CreateTopics creates topics (replication 3 on kfake, min(3, brokers) on a
// real cluster).
func (k *Kafka) CreateTopics(tb testing.TB, partitions int32, topics ...string) {
	tb.Helper()
	k.CreateTopicsWithConfig(tb, partitions, nil, topics...)
}

// CreateTopicsWithConfig creates topics with topic-level configs (such as
// max.message.bytes).
func (k *Kafka) CreateTopicsWithConfig(tb testing.TB, partitions int32, configs map[string]*string, topics ...string) {
	tb.Helper()
	adm := k.Admin(tb)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	brokers, err := adm.ListBrokers(ctx)
	if err != nil {
		tb.Fatal(err)
	}
	rf := int16(min(3, len(brokers)))
	resps, err := adm.CreateTopics(ctx, partitions, rf, configs, topics...)
	if err != nil {
		tb.Fatal(err)
	}
	for _, r := range resps.Sorted() {
		if r.Err != nil {
			tb.Fatalf("create topic %s: %v", r.Topic, r.Err)
		}
	}
}

// Seen is one record as a read_committed consumer saw it.
type Seen struct {
	ID        int64
	Topic     string
	Partition int32
	Offset    int64
	Key       []byte
	Value     []byte
	Headers   map[string]string
}

// Consumer reads topics from the start with isolation.level=read_committed.
type Consumer struct {
	cl *kgo.Client
	mu sync.Mutex
	// All records seen, in the order they were polled.
	all []Seen
}

// NewConsumer starts a read_committed consumer of topics.
func (k *Kafka) NewConsumer(tb testing.TB, topics ...string) *Consumer {
	tb.Helper()
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(k.Brokers...),
		kgo.ConsumeTopics(topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
		kgo.FetchMaxWait(200*time.Millisecond),
	)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(cl.Close)
	return &Consumer{cl: cl}
}

// poll reads what is available within d.
func (c *Consumer) poll(d time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	fs := c.cl.PollFetches(ctx)
	var firstErr error
	fs.EachError(func(t string, p int32, err error) {
		if ctx.Err() == nil && firstErr == nil {
			firstErr = fmt.Errorf("fetch %s/%d: %w", t, p, err)
		}
	})
	c.mu.Lock()
	defer c.mu.Unlock()
	fs.EachRecord(func(r *kgo.Record) {
		s := Seen{Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Key: r.Key, Value: r.Value, Headers: map[string]string{}, ID: -1}
		for _, h := range r.Headers {
			s.Headers[h.Key] = string(h.Value)
			if h.Key == "outbox-id" {
				s.ID, _ = strconv.ParseInt(string(h.Value), 10, 64)
			}
		}
		c.all = append(c.all, s)
	})
	return firstErr
}

// WaitFor polls until at least n records were seen or timeout passes, then
// reads a little longer (to catch duplicates that would follow) and returns
// every record seen.
func (c *Consumer) WaitFor(tb testing.TB, n int, timeout time.Duration) []Seen {
	tb.Helper()
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		c.mu.Lock()
		have := len(c.all)
		c.mu.Unlock()
		if have >= n {
			break
		}
		if err := c.poll(500 * time.Millisecond); err != nil {
			tb.Logf("consumer: %v", err)
		}
	}
	_ = c.poll(time.Second)
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]Seen(nil), c.all...)
}

// CheckExactlyOnce fails the test unless seen holds every id of want exactly
// once and nothing else, and records of one key arrive in id order.
func CheckExactlyOnce(tb testing.TB, want []int64, seen []Seen) {
	tb.Helper()
	count := map[int64]int{}
	for _, s := range seen {
		count[s.ID]++
	}
	var dup, missing, extra []int64
	for _, id := range want {
		switch count[id] {
		case 0:
			missing = append(missing, id)
		case 1:
		default:
			dup = append(dup, id)
		}
		delete(count, id)
	}
	for id := range count {
		extra = append(extra, id)
	}
	if len(dup)+len(missing)+len(extra) > 0 {
		tb.Fatalf("exactly-once broken: %d records seen for %d rows; duplicated ids %v; missing ids %v; unexpected ids %v",
			len(seen), len(want), head(dup), head(missing), head(extra))
	}
	CheckKeyOrder(tb, seen)
}

// CheckPayloads fails the test unless every record in seen carries the key
// and value of its row (by its outbox-id) in db's outbox table: a record
// published without its payload (a tombstone where the row has a value)
// shows here, not in CheckExactlyOnce, which counts ids. The rows must still
// be in the table (mark mode).
func (d *DB) CheckPayloads(tb testing.TB, seen []Seen) {
	tb.Helper()
	ids := make([]int64, len(seen))
	for i, s := range seen {
		ids[i] = s.ID
	}
	rows, err := d.Pool.Query(context.Background(), `SELECT id, key, value FROM `+d.Table.Ident()+` WHERE id = ANY($1)`, ids)
	if err != nil {
		tb.Fatal(err)
	}
	type payload struct{ key, value []byte }
	want := map[int64]payload{}
	var id int64
	var p payload
	if _, err := pgx.ForEachRow(rows, []any{&id, &p.key, &p.value}, func() error {
		want[id] = payload{slices.Clone(p.key), slices.Clone(p.value)}
		return nil
	}); err != nil {
		tb.Fatal(err)
	}
	for _, s := range seen {
		w, ok := want[s.ID]
		switch {
		case !ok:
			tb.Fatalf("record of id %d: no such row in the table", s.ID)
		case !bytes.Equal(s.Key, w.key) || !bytes.Equal(s.Value, w.value) || (s.Value == nil) != (w.value == nil):
			tb.Fatalf("record of id %d carries key %q value %q, its row key %q value %q", s.ID, s.Key, s.Value, w.key, w.value)
		}
	}
}

// CheckKeyOrder fails the test unless the records of each key arrive in
// increasing id order, all on one partition.
func CheckKeyOrder(tb testing.TB, seen []Seen) {
	tb.Helper()
	type last struct {
		id   int64
		part int32
	}
	byKey := map[string]last{}
	for _, s := range seen {
		if s.Key == nil {
			continue
		}
		k := s.Topic + "\x00" + string(s.Key)
		if l, ok := byKey[k]; ok {
			if l.part != s.Partition {
				tb.Fatalf("key %q seen on partitions %d and %d", s.Key, l.part, s.Partition)
			}
			if s.ID <= l.id {
				tb.Fatalf("key %q: id %d arrived after id %d", s.Key, s.ID, l.id)
			}
		}
		byKey[k] = last{s.ID, s.Partition}
	}
}

func head(ids []int64) []int64 {
	sort.Slice(ids, func(i, j int) bool { return ids[i] < ids[j] })
	if len(ids) > 20 {
		return ids[:20]
	}
	return ids
}

// Logger returns a JSON logger writing to the test log (or to w), and a
// buffer-backed copy of every line for assertions.
func Logger(tb testing.TB, extra io.Writer) *slog.Logger {
	w := io.Writer(testWriter{tb})
	if extra != nil {
		w = io.MultiWriter(w, extra)
	}
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ tb testing.TB }

func (t testWriter) Write(p []byte) (int, error) {
	t.tb.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// SyncBuffer is a goroutine-safe bytes buffer for capturing logs.
type SyncBuffer struct {
	mu  sync.Mutex
	buf []byte
}

// Write appends p; it never fails.
func (b *SyncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.buf = append(b.buf, p...)
	return len(p), nil
}

// String returns everything written so far.
func (b *SyncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return string(b.buf)
}

// RelayConfig returns a relay configuration for db and k with test-friendly
// intervals; tests change what they need.
func RelayConfig(db *DB, k *Kafka) relay.Config {
	return relay.Config{
		DatabaseURL:        db.URL,
		KafkaBrokers:       k.Brokers,
		Schema:             db.Table.Schema,
		Table:              db.Table.Name,
		RelayName:          RandomName("relay-"),
		CheckpointTopic:    RandomName("checkpoints-"),
		Shards:             1,
		BatchSize:          100,
		RecoveryWindow:     8,
		StatementTimeout:   30 * time.Second,
		LockTimeout:        5 * time.Second,
		PollInterval:       200 * time.Millisecond,
		RebalanceInterval:  100 * time.Millisecond,
		TransactionTimeout: 10 * time.Second,
		DeliveryTimeout:    30 * time.Second,
		RequestTimeout:     10 * time.Second,
		ShutdownTimeout:    10 * time.Second,
		ClientID:           "outbox-relay-test",
		LogLevel:           "debug",
	}
}

// Running is a relay running in this process.
type Running struct {
	Relay  *relay.Relay
	cancel context.CancelFunc
	done   chan error
	once   sync.Once
	err    error
}

// StartRelay starts a relay on db's pool with cfg; it is stopped with the
// test at the latest.
func StartRelay(tb testing.TB, db *DB, cfg relay.Config, opts ...relay.Option) *Running {
	tb.Helper()
	r, err := relay.New(cfg, db.Pool, opts...)
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	run := &Running{Relay: r, cancel: cancel, done: make(chan error, 1)}
	go func() { run.done <- r.Run(ctx) }()
	tb.Cleanup(func() { run.Stop() })
	return run
}

// Stop cancels the relay and returns what Run returned.
func (r *Running) Stop() error {
	r.once.Do(func() {
		r.cancel()
		r.err = <-r.done
	})
	return r.err
}

// Wait returns Run's result once it ends on its own (a failpoint), or fails
// the test after timeout.
func (r *Running) Wait(tb testing.TB, timeout time.Duration) error {
	tb.Helper()
	select {
	case err := <-r.done:
		r.once.Do(func() { r.err = err })
		return err
	case <-time.After(timeout):
		tb.Fatalf("relay did not stop within %v", timeout)
		return nil
	}
}

// RequireNoBenchScratchLeft fails the test when a scratch schema of
// `outbox-relay bench` (outbox_bench_*, in pg_namespace) or one of its
// scratch topics (outbox-bench-*, in Kafka's metadata) is left.
func RequireNoBenchScratchLeft(t testing.TB, dbURL string, brokers []string) {
	t.Helper()
	ctx := context.Background()
	conn, err := pgx.Connect(ctx, dbURL)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(ctx)
	rows, _ := conn.Query(ctx, `SELECT nspname FROM pg_namespace WHERE nspname LIKE 'outbox_bench_%'`)
	schemas, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	if len(schemas) > 0 {
		t.Errorf("scratch schemas left: %v", schemas)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	topics, err := kadm.NewClient(cl).ListTopics(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range topics.Names() {
		if strings.HasPrefix(name, "outbox-bench-") {
			t.Errorf("scratch topic left: %s", name)
		}
	}
}
