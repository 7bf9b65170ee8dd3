package integration

import (
	"bufio"
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// logicalCluster is a private PostgreSQL at wal_level=logical (with the
// extra settings) and a migrated outbox table on it.
func logicalCluster(t *testing.T, settings ...string) (*testenv.PrivatePostgres, *testenv.DB) {
	t.Helper()
	pg := testenv.StartPrivatePostgres(t, append([]string{"wal_level=logical", "max_replication_slots=8", "max_wal_senders=8"}, settings...)...)
	url := pg.URL("postgres", "postgres")
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	return pg, &testenv.DB{URL: url, Pool: pool, Table: outbox.DefaultTable}
}

// replKillRounds is OUTBOX_REPL_KILL_ROUNDS, default 5 (CI); the issue's
// soak is 20.
func replKillRounds(t *testing.T) int {
	t.Helper()
	v := os.Getenv("OUTBOX_REPL_KILL_ROUNDS")
	if v == "" {
		return 5
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("OUTBOX_REPL_KILL_ROUNDS is %q: expected a positive integer", v)
	}
	return n
}

// replProcessEnv is relayProcessEnv in OUTBOX_SOURCE=replication.
func replProcessEnv(db *testenv.DB, k *testenv.Kafka) []string {
	return append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")),
		"OUTBOX_SOURCE=replication", "OUTBOX_DEAD_LETTER_ORDER=skip")
}

// mixedWriters are four writers, each the only one of its keys (so that id
// order is commit order per key): single-row transactions, small
// multi-row Write transactions, COPY transactions of 64 to 180 rows (many
// larger than the relay's batch of 50, so they are cut in parts), and
// plain multi-row INSERT ... VALUES statements.
type mixedWriters struct {
	stopc chan struct{}
	wg    sync.WaitGroup
	rows  atomic.Int64
	txns  [4]atomic.Int64
	mu    sync.Mutex
	err   error
}

var mixedKinds = [4]string{"single-row", "multi-row Write", "COPY", "INSERT VALUES"}

func startMixedWriters(t *testing.T, db *testenv.DB, topic string) *mixedWriters {
	t.Helper()
	w := &mixedWriters{stopc: make(chan struct{})}
	for kind := range 4 {
		w.wg.Add(1)
		go func() {
			defer w.wg.Done()
			keys := make([]string, 5)
			for i := range keys {
				keys[i] = fmt.Sprintf("w%d-acct-%d", kind, i)
			}
			pause := []time.Duration{2 * time.Millisecond, 5 * time.Millisecond, 150 * time.Millisecond, 20 * time.Millisecond}[kind]
			next := 0
			for tx := 0; ; tx++ {
				select {
				case <-w.stopc:
					return
				case <-time.After(pause):
				}
				n := []int{1, 2 + rand.IntN(6), 64 + rand.IntN(117), 3 + rand.IntN(20)}[kind]
				msgs := make([]outbox.Message, n)
				for i := range msgs {
					msgs[i] = outbox.Message{Topic: topic, Key: []byte(keys[next%len(keys)]), Value: fmt.Appendf(nil, `{"w":%d,"tx":%d,"n":%d}`, kind, tx, next)}
					next++
				}
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
					switch kind {
					case 2:
						return db.Table.WriteMany(ctx, tx, msgs)
					case 3:
						var sb strings.Builder
						args := []any{topic}
						sb.WriteString(`INSERT INTO outbox (topic, key, value) VALUES `)
						for i, m := range msgs {
							if i > 0 {
								sb.WriteString(", ")
							}
							fmt.Fprintf(&sb, "($1, $%d, $%d)", len(args)+1, len(args)+2)
							args = append(args, m.Key, m.Value)
						}
						_, err := tx.Exec(ctx, sb.String(), args...)
						return err
					default:
						return db.Table.Write(ctx, tx, msgs...)
					}
				})
				cancel()
				if err != nil {
					w.mu.Lock()
					w.err = fmt.Errorf("%s writer: %w", mixedKinds[kind], err)
					w.mu.Unlock()
					return
				}
				w.rows.Add(int64(n))
				w.txns[kind].Add(1)
			}
		}()
	}
	return w
}

func (w *mixedWriters) halt() {
	select {
	case <-w.stopc:
	default:
		close(w.stopc)
	}
	w.wg.Wait()
}

func (w *mixedWriters) stop(t *testing.T) int64 {
	t.Helper()
	w.halt()
	if w.err != nil {
		t.Fatal(w.err)
	}
	return w.rows.Load()
}

// burst commits n rows of topic in one COPY transaction, keys of their
// own.
func burst(t *testing.T, db *testenv.DB, topic string, n int) {
	t.Helper()
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: topic, Key: []byte(fmt.Sprintf("burst-%d", i%7)), Value: fmt.Appendf(nil, `{"burst":%d}`, i)}
	}
	ctx := context.Background()
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
		t.Fatalf("burst of %d rows: %v", n, err)
	}
}

// kcatRead reads topic with kcat at read_committed and returns, per id, how
// often it was seen, and fails the test when the records of a key are not
// in increasing id order within their partition.
func kcatRead(t *testing.T, k *testenv.Kafka, topic string) map[int64]int {
	t.Helper()
	kcat, err := exec.LookPath("kcat")
	if err != nil {
		t.Fatalf("kcat is not on PATH (apt-get install kcat): %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, kcat, "-C", "-q", "-e", "-o", "beginning",
		"-b", strings.Join(k.Brokers, ","), "-t", topic,
		"-X", "isolation.level=read_committed",
		"-f", "%p\t%o\t%S\t%K\t%h\t%k\n")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, stderr.String())
	}
	type rec struct {
		clientRecord
		id int64
	}
	var recs []rec
	sc := bufio.NewScanner(strings.NewReader(string(out)))
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		r, id, err := parseKcatLine(sc.Text())
		if err != nil {
			t.Fatalf("kcat printed %q: %v", sc.Text(), err)
		}
		recs = append(recs, rec{r, id})
	}
	sort.Slice(recs, func(i, j int) bool {
		if recs[i].partition != recs[j].partition {
			return recs[i].partition < recs[j].partition
		}
		return recs[i].offset < recs[j].offset
	})
	count := map[int64]int{}
	last := map[string]int64{}
	part := map[string]int32{}
	for _, r := range recs {
		count[r.id]++
		key := string(r.key)
		if p, ok := part[key]; ok && p != r.partition {
			t.Fatalf("kcat: key %q on partitions %d and %d", key, p, r.partition)
		}
		if l, ok := last[key]; ok && r.id <= l {
			t.Fatalf("kcat: key %q: id %d at offset %d after id %d: not in commit order", key, r.id, r.offset, l)
		}
		last[key], part[key] = r.id, r.partition
	}
	return count
}

// checkCounts fails the test unless count holds every id of want once and
// nothing else.
func checkCounts(t *testing.T, who string, want []int64, count map[int64]int) {
	t.Helper()
	var lost, dup []int64
	for _, id := range want {
		switch count[id] {
		case 0:
			lost = append(lost, id)
		case 1:
		default:
			dup = append(dup, id)
		}
	}
	if len(lost)+len(dup) > 0 || len(count) != len(want) {
		t.Fatalf("%s: %d distinct ids for %d rows: lost %d %v, duplicated %d %v", who, len(count), len(want), len(lost), lost[:min(20, len(lost))], len(dup), dup[:min(20, len(dup))])
	}
}

// TestReplicationKillNineUnderLoad kills the built binary in
// OUTBOX_SOURCE=replication with SIGKILL (OUTBOX_REPL_KILL_ROUNDS times,
// default 5) while four writers commit single-row, multi-row, COPY and
// INSERT ... VALUES transactions (COPY ones larger than a batch), at random
// moments counted from the stream's start or from the process start, each
// just after a 500-row COPY (ten batches), so that kills land between the
// parts of one transaction and inside Kafka transactions. A last run is
// stopped with SIGTERM (exit 0). The Go consumer and kcat, both
// read_committed, must each see every row once, each key's rows in commit
// order.
func TestReplicationKillNineUnderLoad(t *testing.T) {
	rounds := replKillRounds(t)
	bin := buildRelayBinary(t)
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := replProcessEnv(db, k)
	logs := newRelayLogs(t, "repl-kill")
	c := k.NewConsumer(t, topic)

	// Rows before the first start: the hand-over publishes them.
	db.Insert(t, topic, 120, []string{"pre-1", "pre-2", "pre-3"})
	w := startMixedWriters(t, db, topic)
	defer w.halt()
	var streamed, progressed int
	var bursts int64
	lastSeen := 0
	for i := range rounds {
		p := startRelayProcess(t, bin, env, logs)
		if i%2 == 0 {
			waitUntil(t, 90*time.Second, p, "\"replication stream started\"", func() bool { return len(p.log.find("replication stream started")) > 0 })
		}
		time.Sleep(time.Duration(100+rand.IntN(1400)) * time.Millisecond)
		if p.exited() {
			t.Fatalf("round %d: the relay exited on its own before the kill: %v\n%s", i, p.state(), p.log.text())
		}
		// A COPY of 500 rows (ten parts of a batch) just before the kill,
		// so that it lands among the parts of one transaction.
		burst(t, db, topic, 500)
		bursts += 500
		time.Sleep(time.Duration(rand.IntN(40)) * time.Millisecond)
		p.kill(t)
		if st := p.state(); !killedBySIGKILL(st) {
			t.Fatalf("round %d: the relay ended with %v, not SIGKILL\n%s", i, st, p.log.text())
		}
		if len(p.log.find("replication stream started")) > 0 {
			streamed++
		}
		if n := len(c.WaitFor(t, 0, 0)); n > lastSeen {
			progressed++
			lastSeen = n
		}
	}
	written := w.stop(t)
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written+120+bursts {
		t.Fatalf("the writers committed %d rows (+120 before), the outbox holds %d", written, len(ids))
	}
	last := startRelayProcess(t, bin, env, logs)
	seen := c.WaitFor(t, len(ids), 120*time.Second)
	last.signal(t, syscall.SIGTERM)
	if st := last.wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the relay exited with %v\n%s", st, last.log.text())
	}
	if n := deadLetters(t, db); n > 0 {
		t.Fatalf("%d rows were dead-lettered", n)
	}
	seen = c.WaitFor(t, len(ids), time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	checkCounts(t, "kcat", ids, kcatRead(t, k, topic))
	aborted, republished := abortedWork(t, k, topic, len(seen))
	t.Logf("%d kills (%d after the stream started, %d rounds made progress); transactions: %d single-row, %d multi-row, %d COPY, %d INSERT VALUES; "+
		"%d aborted records, %d ids aborted then republished; %d rows each once (Go consumer and kcat, read_committed), keys in commit order",
		rounds, streamed, progressed, w.txns[0].Load(), w.txns[1].Load(), w.txns[2].Load(), w.txns[3].Load(), aborted, republished, len(ids))
	if progressed == 0 {
		t.Errorf("no round published anything before its kill")
	}
}

// slotRetained is how many bytes of WAL the slot holds behind the
// server's current position: from its confirmed_flush_lsn and from its
// restart_lsn.
func slotRetained(t *testing.T, db *testenv.DB) (confirmed, restart int64) {
	t.Helper()
	if err := db.Pool.QueryRow(context.Background(), `SELECT coalesce(pg_current_wal_lsn() - confirmed_flush_lsn, -1)::bigint, coalesce(pg_current_wal_lsn() - restart_lsn, -1)::bigint
FROM pg_replication_slots WHERE slot_type = 'logical'`).Scan(&confirmed, &restart); err != nil {
		t.Fatalf("read the slot: %v", err)
	}
	return confirmed, restart
}

// TestReplicationIdleOutboxDoesNotPinWAL: the relay in
// OUTBOX_SOURCE=replication, an outbox that goes idle after a few rows, and
// another table written at about 1 MB/s for 25 s. The WAL the slot retains
// (behind confirmed_flush_lsn, and behind restart_lsn) must not grow with
// what the other table writes, and must return to near zero within seconds
// once the writes stop; the rows are published once.
func TestReplicationIdleOutboxDoesNotPinWAL(t *testing.T) {
	_, db := logicalCluster(t, "wal_sender_timeout=60s")
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
	want := db.Insert(t, topic, 10, []string{"a", "b"})
	c := k.NewConsumer(t, topic)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	c.WaitFor(t, len(want), 60*time.Second)
	want = append(want, db.Insert(t, topic, 10, []string{"a", "b"})...)
	c.WaitFor(t, len(want), 60*time.Second)

	ctx := context.Background()
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE busy (id bigserial PRIMARY KEY, pad text)`); err != nil {
		t.Fatal(err)
	}
	var start string
	if err := db.Pool.QueryRow(ctx, `SELECT pg_current_wal_lsn()::text`).Scan(&start); err != nil {
		t.Fatal(err)
	}
	var maxConfirmed, maxRestart int64
	minLate := int64(-1) // the least retained WAL sampled after 15 s of writes
	var samples []string
	begin := time.Now()
	sample := func() (int64, int64) {
		cf, rs := slotRetained(t, db)
		maxConfirmed, maxRestart = max(maxConfirmed, cf), max(maxRestart, rs)
		if time.Since(begin) > 15*time.Second && (minLate < 0 || cf < minLate) {
			minLate = cf
		}
		samples = append(samples, fmt.Sprintf("%d/%d", cf>>10, rs>>10))
		return cf, rs
	}
	next := time.Now()
	for time.Since(begin) < 25*time.Second {
		if _, err := db.Pool.Exec(ctx, `INSERT INTO busy (pad) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 100) g`); err != nil {
			t.Fatal(err)
		}
		if time.Now().After(next) {
			sample()
			next = time.Now().Add(time.Second)
		}
		time.Sleep(100 * time.Millisecond)
	}
	var written int64
	if err := db.Pool.QueryRow(ctx, `SELECT (pg_current_wal_lsn() - $1::pg_lsn)::bigint`, start).Scan(&written); err != nil {
		t.Fatal(err)
	}
	stopped := time.Now()
	var cf, rs int64
	for {
		cf, rs = sample()
		if (cf < 64<<10 && rs < 1<<20) || time.Since(stopped) > 40*time.Second {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	settled := time.Since(stopped)
	t.Logf("the other table wrote %d KiB of WAL in 25 s; retained KiB (confirmed/restart) each second: %s", written>>10, strings.Join(samples, " "))
	t.Logf("max retained while writing: %d KiB behind confirmed_flush_lsn, %d KiB behind restart_lsn; %v after the writes stopped: %d B and %d B",
		maxConfirmed>>10, maxRestart>>10, settled.Round(100*time.Millisecond), cf, rs)
	if cf >= 64<<10 || rs >= 1<<20 {
		t.Fatalf("40 s after the other table's writes stopped the slot still retains %d B behind confirmed_flush_lsn and %d B behind restart_lsn: an idle outbox pins WAL", cf, rs)
	}
	if minLate < 0 || minLate > written/4 {
		t.Fatalf("while the other table wrote %d B the slot retained at least %d B in the last 10 s of writes: the idle outbox pins WAL", written, minLate)
	}
	testenv.CheckExactlyOnce(t, want, c.WaitFor(t, len(want), time.Second))
}

// TestReplicationSplitTransactionCrashBetweenParts: one PostgreSQL
// transaction of 175 rows with OUTBOX_BATCH_SIZE=50 is cut into parts of
// 50, 50, 50 and 25 rows, each its own Kafka transaction. The relay crashes
// after the Kafka commit of each of the first three parts in turn (before
// the slot is confirmed), and each restart goes on with the next part:
// the cuts are the same in every run, and no row is repeated or lost.
func TestReplicationSplitTransactionCrashBetweenParts(t *testing.T) {
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.Source, cfg.DeadLetterOrder, cfg.BatchSize = "replication", "skip", 50
	keys := []string{"acct-1", "acct-2", "acct-3"}
	c := k.NewConsumer(t, topic)
	want := db.Insert(t, topic, 5, keys)

	var mu sync.Mutex
	var batches [][]int64 // the ids of each committed Kafka transaction, every run
	var bigIDs map[int64]int
	bigParts := 0
	crashAt := 0 // crash after the commit of the big transaction's part crashAt (1-based); 0: none
	fail := func(_ context.Context, name string, _ int32, ids []int64) error {
		if name != relay.FailAfterCommit {
			return nil
		}
		mu.Lock()
		defer mu.Unlock()
		batches = append(batches, append([]int64(nil), ids...))
		for _, id := range ids {
			if _, ok := bigIDs[id]; ok {
				bigParts++
				if bigParts == crashAt {
					return fmt.Errorf("crash after the Kafka commit of part %d of the large transaction", bigParts)
				}
				break
			}
		}
		return nil
	}
	setCrash := func(n int) { mu.Lock(); crashAt = n; mu.Unlock() }
	setCrash(1)
	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(fail))
	c.WaitFor(t, len(want), 60*time.Second)

	// A small transaction, the large one, a small one, committed one after
	// the other.
	want = append(want, db.Insert(t, topic, 3, keys)...)
	ctx := context.Background()
	rows, err := db.Pool.Query(ctx, `INSERT INTO outbox (topic, key, value) SELECT $1, convert_to('big-' || (g % 4), 'UTF8'), convert_to('v' || g, 'UTF8') FROM generate_series(1, 175) g ORDER BY g RETURNING id`, topic)
	if err != nil {
		t.Fatal(err)
	}
	big, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	bigIDs = map[int64]int{}
	for i, id := range big {
		bigIDs[id] = i
	}
	mu.Unlock()
	want = append(want, big...)
	want = append(want, db.Insert(t, topic, 4, keys)...)
	for n := 1; n <= 3; n++ {
		if err := run.Wait(t, 60*time.Second); err == nil {
			t.Fatalf("the relay did not stop after part %d", n)
		}
		if n < 3 {
			setCrash(n + 1)
		} else {
			setCrash(0)
		}
		mu.Lock()
		bigParts = n // a restart goes on with part n+1
		mu.Unlock()
		run = testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(fail))
	}
	seen := c.WaitFor(t, len(want), 60*time.Second)
	testenv.CheckExactlyOnce(t, want, seen)

	// The large transaction's rows in each Kafka transaction: the parts
	// [0,50) [50,100) [100,150) [150,175), in that order, each once.
	mu.Lock()
	defer mu.Unlock()
	var parts [][2]int
	for _, b := range batches {
		lo, hi, n := -1, -1, 0
		for _, id := range b {
			if i, ok := bigIDs[id]; ok {
				if lo < 0 || i < lo {
					lo = i
				}
				hi = max(hi, i)
				n++
			}
		}
		if n > 0 {
			if hi-lo+1 != n {
				t.Fatalf("a Kafka transaction holds %d rows of the large transaction, not consecutive ones (%d..%d)", n, lo, hi)
			}
			parts = append(parts, [2]int{lo, hi + 1})
		}
	}
	wantParts := [][2]int{{0, 50}, {50, 100}, {100, 150}, {150, 175}}
	if fmt.Sprint(parts) != fmt.Sprint(wantParts) {
		t.Fatalf("the large transaction was committed in the parts %v across 3 crashes, want %v", parts, wantParts)
	}
	t.Logf("%d Kafka transactions; the large transaction's parts %v, a crash after each of the first three; %d rows once", len(batches), parts, len(want))
}

// TestReplicationTwoRelaysRaceForTheSlot runs two relay processes on the
// same table and slot while the mixed writers commit, in rounds: both
// started at once, then the one streaming is killed with SIGKILL, or
// frozen with SIGSTOP (its walsender and TCP connections stay up) until the
// other has taken the shard and the slot over, then let go again with
// SIGCONT, a zombie that must neither commit nor confirm. Every row once,
// keys in commit order, for the Go consumer and kcat.
func TestReplicationTwoRelaysRaceForTheSlot(t *testing.T) {
	bin := buildRelayBinary(t)
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := append(replProcessEnv(db, k), "OUTBOX_OWNER_LEASE=3s")
	logs := newRelayLogs(t, "repl-race")
	c := k.NewConsumer(t, topic)
	w := startMixedWriters(t, db, topic)
	defer w.halt()
	streaming := func(p *relayProcess) int { return len(p.log.find("replication stream started")) }
	procs := []*relayProcess{startRelayProcess(t, bin, env, logs), startRelayProcess(t, bin, env, logs)}
	var kills, stops int
	for round := range max(4, replKillRounds(t)) {
		// The owner: the one whose stream started last.
		var owner *relayProcess
		eventually(t, 60*time.Second, "a relay streaming", func() bool {
			for _, p := range procs {
				if p.exited() {
					t.Fatalf("round %d: a relay exited on its own: %v\n%s", round, p.state(), p.log.text())
				}
				if streaming(p) > 0 && (owner == nil || streaming(p) > streaming(owner)) {
					owner = p
				}
			}
			return owner != nil
		})
		time.Sleep(time.Duration(300+rand.IntN(1200)) * time.Millisecond)
		other := procs[0]
		if other == owner {
			other = procs[1]
		}
		if round%2 == 1 {
			before := streaming(other)
			owner.signal(t, syscall.SIGSTOP)
			stops++
			eventually(t, 60*time.Second, "the other relay streaming while the owner is frozen", func() bool { return streaming(other) > before })
			time.Sleep(500 * time.Millisecond)
			owner.signal(t, syscall.SIGCONT)
			time.Sleep(time.Duration(500+rand.IntN(1000)) * time.Millisecond)
			continue
		}
		owner.kill(t)
		kills++
		procs = []*relayProcess{other, startRelayProcess(t, bin, env, logs)}
	}
	written := w.stop(t)
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written {
		t.Fatalf("the writers committed %d rows, the outbox holds %d", written, len(ids))
	}
	seen := c.WaitFor(t, len(ids), 120*time.Second)
	for _, p := range procs {
		if !p.exited() {
			p.signal(t, syscall.SIGTERM)
			p.wait(t, 40*time.Second)
		}
	}
	seen = c.WaitFor(t, len(ids), time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	checkCounts(t, "kcat", ids, kcatRead(t, k, topic))
	t.Logf("two relays: %d owners killed, %d frozen and taken over (then let go), %d rows each once (Go consumer and kcat)", kills, stops, len(ids))
}

// TestReplicationKillNineDuringTheHandOver: 20,000 rows are waiting when
// the relay first starts in OUTBOX_SOURCE=replication, so its hand-over
// from the poll read (slot created, the waiting rows published and marked
// by the poll path, then the stream) takes a while; the binary is killed
// with SIGKILL inside it, again and again, while the mixed writers commit.
// Every row once, for the Go consumer and kcat; the rows of the hand-over
// are marked, and the stream's are not.
func TestReplicationKillNineDuringTheHandOver(t *testing.T) {
	bin := buildRelayBinary(t)
	_, db := logicalCluster(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := replProcessEnv(db, k)
	logs := newRelayLogs(t, "repl-handover")
	c := k.NewConsumer(t, topic)
	for range 4 {
		db.Insert(t, topic, 5000, []string{"pre-1", "pre-2", "pre-3", "pre-4"})
	}
	w := startMixedWriters(t, db, topic)
	defer w.halt()
	inHandOver := 0
	for i := range max(3, replKillRounds(t)) {
		p := startRelayProcess(t, bin, env, logs)
		waitUntil(t, 90*time.Second, p, "\"shard recovered\"", func() bool { return len(p.log.find("shard recovered")) > 0 })
		time.Sleep(time.Duration(50+rand.IntN(400)) * time.Millisecond)
		if p.exited() {
			t.Fatalf("round %d: the relay exited on its own: %v\n%s", i, p.state(), p.log.text())
		}
		p.kill(t)
		if len(p.log.find("replication stream started")) == 0 {
			inHandOver++
		}
	}
	written := w.stop(t)
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != written+20000 {
		t.Fatalf("the writers committed %d rows (+20000 before), the outbox holds %d", written, len(ids))
	}
	last := startRelayProcess(t, bin, env, logs)
	seen := c.WaitFor(t, len(ids), 180*time.Second)
	last.signal(t, syscall.SIGTERM)
	if st := last.wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the relay exited with %v\n%s", st, last.log.text())
	}
	seen = c.WaitFor(t, len(ids), time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	checkCounts(t, "kcat", ids, kcatRead(t, k, topic))
	t.Logf("%d kills, %d of them before the stream started (inside the hand-over); %d rows each once (Go consumer and kcat)", max(3, replKillRounds(t)), inHandOver, len(ids))
	if inHandOver == 0 {
		t.Errorf("no kill landed inside the hand-over")
	}
}
