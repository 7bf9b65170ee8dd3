package integration

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestKillNineUnderLoadExactlyOnce runs the real binary as an OS process and
// kills it with SIGKILL at random moments while writers keep inserting, again
// and again (OUTBOX_KILL_ROUNDS, default 20). A kill can land anywhere: in the
// middle of a Kafka transaction (the next owner's InitProducerID aborts it),
// between the commit and the mark (the next owner marks the ids of the
// checkpoint), while holding the shard's advisory lock (Postgres frees it
// when the socket closes). A last run drains the outbox and is stopped with
// SIGTERM, which must exit 0. A read_committed consumer must then see every
// row exactly once, in id order per key.
func TestKillNineUnderLoadExactlyOnce(t *testing.T) {
	killNineUnderLoad(t, killRounds(t), outbox.Mark)
}

// TestKillNineUnderLoadExactlyOnceDeleteMode is the same soak with
// OUTBOX_ON_PUBLISH=delete, in fewer rounds (one of each kind; at most
// OUTBOX_KILL_ROUNDS): every row committed by the writers reaches Kafka
// exactly once, and the relay deletes every one (a test trigger records the
// deleted ids, which stand for the rows).
func TestKillNineUnderLoadExactlyOnceDeleteMode(t *testing.T) {
	killNineUnderLoad(t, min(killRounds(t), 4), outbox.Delete)
}

// killNineUnderLoad is the kill -9 soak of rounds rounds, with the relay
// settling published rows as onPublish says.
func killNineUnderLoad(t *testing.T, rounds int, onPublish outbox.OnPublish) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")), "OUTBOX_ON_PUBLISH="+string(onPublish))
	logs := newRelayLogs(t, "kill")
	countPublished := countPublished
	if onPublish == outbox.Delete {
		countPublished = recordDeletedIDs(t, db)
	}

	w := startLoadWriter(t, db, topic, loadKeys(40), time.Millisecond)
	defer w.halt()

	// Round kinds, in turn: a random run time counted from the end of
	// recovery (kills land in the publish loop, even when a loaded machine
	// makes start-up slower than the run time); one counted from the start
	// (kills land in start-up and recovery too); after recovery again; and
	// a kill inside the window between the Kafka commit and the mark, held
	// open by the test (a rare landing for a random kill, as the mark takes
	// a millisecond).
	const (
		afterRecovery = iota
		fromStart
		inMarkWindow
	)
	kinds := []int{afterRecovery, fromStart, afterRecovery, inMarkWindow}
	var (
		withBacklog   int   // kills while rows were unpublished
		recovered     int   // runs that reached "shard recovered" before their kill
		windowKills   int   // kills while a committed batch waited for its mark
		repairedRuns  int   // runs whose recovery marked rows a kill left committed but unmarked
		repairedRows  int64 // rows so marked
		lastPublished int64
		progressed    int  // rounds in which the published count grew
		mustRepair    bool // the previous run was killed between commit and mark
	)
	// checkRepair counts what the recovery of p marked, and fails the test
	// when p followed a kill between commit and mark and marked nothing.
	checkRepair := func(p *relayProcess) {
		recs := p.log.find("shard recovered")
		if len(recs) == 0 {
			return
		}
		m := sumField(recs, "marked")
		if m > 0 {
			repairedRuns++
			repairedRows += m
		} else if mustRepair {
			t.Errorf("relay run %d was killed between the Kafka commit and the mark, but the recovery of run %d marked no row: "+
				"the committed rows are left to be published again", p.log.run-1, p.log.run)
		}
		mustRepair = false
	}
	for i := range rounds {
		kind := kinds[i%len(kinds)]
		p := startRelayProcess(t, bin, env, logs)
		if kind != fromStart {
			waitUntil(t, 60*time.Second, p, "\"shard recovered\"", func() bool { return len(p.log.find("shard recovered")) > 0 })
		}
		time.Sleep(time.Duration(50+rand.IntN(651)) * time.Millisecond)
		if p.exited() {
			t.Fatalf("round %d: the relay exited on its own before the kill: %v\n%s", i, p.state(), p.log.text())
		}
		var release func()
		if kind == inMarkWindow {
			release = holdInMarkWindow(t, db, p)
		}
		// A burst just before the kill, so that it lands while a batch is
		// read, published or marked, however quickly the relay kept up
		// with the steady writer (in delete mode it drains as fast as the
		// writer commits).
		w.burst(t, db, topic, 200)
		backlog := db.Unpublished(t)
		p.kill(t)
		if st := p.state(); !killedBySIGKILL(st) {
			t.Fatalf("round %d: the relay was not killed by SIGKILL but ended with %v\n%s", i, st, p.log.text())
		}
		if release != nil {
			release()
		}
		if backlog > 0 {
			withBacklog++
		}
		if len(p.log.find("shard recovered")) > 0 {
			recovered++
		}
		checkRepair(p)
		if kind == inMarkWindow {
			windowKills++
			mustRepair = true
		}
		published := countPublished(t, db)
		if published > lastPublished {
			progressed++
		}
		lastPublished = published
	}

	written := w.stop(t)
	last := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 90*time.Second, last, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	checkRepair(last)
	last.signal(t, syscall.SIGTERM)
	st := last.wait(t, 40*time.Second)
	if st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the relay exited with %v, want exit code 0\n%s", st, last.log.text())
	}
	if len(last.log.find("relay stopped")) == 0 {
		t.Errorf("after SIGTERM the relay exited 0 without logging \"relay stopped\"\n%s", last.log.text())
	}

	ids := outboxIDs(t, db, "")
	if onPublish == outbox.Delete {
		if len(ids) > 0 {
			t.Fatalf("in delete mode the drained outbox still holds %d rows: %v", len(ids), ids[:min(len(ids), 20)])
		}
		ids = deletedIDs(t, db)
	}
	if int64(len(ids)) != written {
		t.Fatalf("the writers committed %d rows, the outbox holds %d", written, len(ids))
	}
	if n := deadLetters(t, db); n > 0 {
		t.Fatalf("%d rows were dead-lettered; none of these rows is invalid", n)
	}
	seen := k.NewConsumer(t, topic).WaitFor(t, len(ids), 90*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)

	// Work the kills cut off inside a transaction: records that were
	// produced, then aborted (by the next owner's InitProducerID) and
	// published again by a later transaction.
	abortedRecs, republished := abortedWork(t, k, topic, len(seen))
	t.Logf("%d kills: %d with unpublished rows at kill time, %d after the shard had recovered, %d rounds made progress; "+
		"%d kills held between commit and mark; recovery marked %d committed-but-unmarked rows in %d runs; "+
		"%d aborted records in the log, %d ids aborted then republished (a kill inside a transaction); %d rows checked exactly once",
		rounds, withBacklog, recovered, progressed, windowKills, repairedRows, repairedRuns, abortedRecs, republished, len(ids))
	if withBacklog <= rounds/2 {
		t.Errorf("only %d of %d kills happened while rows were unpublished: the kills did not land under load", withBacklog, rounds)
	}
	if progressed == 0 {
		t.Errorf("no round published anything before its kill: the kills all landed during start-up")
	}
}

// TestSIGTERMExitsCleanly stops a busy relay with SIGTERM: it must finish the
// batch it has open, exit 0, and leave Kafka holding exactly the rows marked
// published, so that the next start has nothing to repair.
func TestSIGTERMExitsCleanly(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	env := relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-"))
	logs := newRelayLogs(t, "sigterm")
	keys := loadKeys(40)

	// A backlog deep enough that the signal lands while batches are in
	// flight, and writers that keep going through the stop.
	const preload = 20000
	msgs := make([]outbox.Message, preload)
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: topic, Key: []byte(keys[i%len(keys)]), Value: fmt.Appendf(nil, `{"n":%d}`, i)}
	}
	ctx := context.Background()
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
		t.Fatal(err)
	}
	w := startLoadWriter(t, db, topic, keys, 2*time.Millisecond)
	defer w.halt()

	p := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 60*time.Second, p, "500 rows published", func() bool { return countPublished(t, db) >= 500 })
	backlog := db.Unpublished(t)
	p.signal(t, syscall.SIGTERM)
	st := p.wait(t, 40*time.Second)
	if st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the busy relay exited with %v, want exit code 0\n%s", st, p.log.text())
	}
	if len(p.log.find("relay stopped")) == 0 {
		t.Errorf("after SIGTERM the relay exited 0 without logging \"relay stopped\"\n%s", p.log.text())
	}
	if backlog == 0 {
		t.Fatalf("the relay was idle when SIGTERM was sent: the test did not stop a busy relay")
	}

	// A clean stop commits and marks the batch it has open: Kafka holds
	// exactly the rows marked published, no more (committed, unmarked) and
	// no fewer.
	marked := outboxIDs(t, db, "published_at IS NOT NULL")
	c := k.NewConsumer(t, topic)
	seen := c.WaitFor(t, len(marked), 60*time.Second)
	testenv.CheckExactlyOnce(t, marked, seen)
	t.Logf("SIGTERM with %d rows unpublished: exit 0, %d rows published and marked, all in Kafka exactly once", backlog, len(marked))

	// The next start finds nothing to repair and publishes the rest.
	written := w.stop(t)
	p2 := startRelayProcess(t, bin, env, logs)
	waitUntil(t, 90*time.Second, p2, "the outbox to drain", func() bool { return db.Unpublished(t) == 0 })
	if m := sumField(p2.log.find("shard recovered"), "marked"); m != 0 {
		t.Errorf("after a clean stop, recovery marked %d rows: the stop left committed rows unmarked", m)
	}
	p2.signal(t, syscall.SIGTERM)
	if st := p2.wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the idle relay exited with %v, want exit code 0\n%s", st, p2.log.text())
	}
	ids := outboxIDs(t, db, "")
	if int64(len(ids)) != preload+written {
		t.Fatalf("%d rows were written, the outbox holds %d", preload+written, len(ids))
	}
	seen = c.WaitFor(t, len(ids), 90*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
}

// holdInMarkWindow holds the relay of p between a Kafka commit and the mark
// of its rows: a transaction of the test locks every unpublished row, so
// the relay's next batch commits in Kafka and then waits for the lock in its
// UPDATE. It returns once that UPDATE waits (I1: the relay marks only after
// the commit, so the batch is committed). Call the returned function after
// killing the relay: it terminates the dead relay's waiting backend, which
// Postgres would otherwise let finish the mark once the lock is free (a
// backend waiting for a lock does not notice its client is gone), and
// releases the locks.
func holdInMarkWindow(t *testing.T, db *testenv.DB, p *relayProcess) (release func()) {
	t.Helper()
	return awaitBlockedMark(t, db, p, lockUnpublishedRows(t, db))
}

// lockUnpublishedRows locks every unpublished row FOR UPDATE in a
// transaction of the test's, retrying until there is one: a relay reads the
// rows (a read does not wait for row locks) and publishes them, and its
// mark waits for the locks.
func lockUnpublishedRows(t *testing.T, db *testenv.DB) pgx.Tx {
	t.Helper()
	ctx := context.Background()
	for deadline := time.Now().Add(30 * time.Second); ; {
		tx, err := db.Pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var locked int
		if err := tx.QueryRow(ctx, `SELECT count(*) FROM (SELECT id FROM outbox WHERE published_at IS NULL FOR UPDATE) l`).Scan(&locked); err != nil {
			t.Fatal(err)
		}
		if locked > 0 {
			t.Cleanup(func() { _ = tx.Rollback(ctx) }) // before the pool closes, if the test fails early
			return tx
		}
		_ = tx.Rollback(ctx)
		if time.Now().After(deadline) {
			t.Fatalf("no unpublished row to lock within 30s")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// awaitBlockedMark waits until a mark of relay p waits for the row locks tx
// holds (the rows are committed in Kafka and unmarked), and returns release,
// which ends the killed relay's waiting backends and then tx.
func awaitBlockedMark(t *testing.T, db *testenv.DB, p *relayProcess, tx pgx.Tx) (release func()) {
	t.Helper()
	ctx := context.Background()
	const waitingMarks = `SELECT pid FROM pg_stat_activity WHERE datname = current_database()
  AND wait_event_type = 'Lock' AND (query LIKE '%UPDATE %SET published_at = now()%' OR query LIKE '%DELETE FROM %published_at IS NULL AND EXISTS (SELECT FROM %')`
	release = func() {
		defer tx.Rollback(ctx) //nolint:errcheck
		for deadline := time.Now().Add(30 * time.Second); ; {
			rows, err := db.Pool.Query(ctx, waitingMarks)
			if err != nil {
				t.Fatal(err)
			}
			pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
			if err != nil {
				t.Fatal(err)
			}
			if len(pids) == 0 {
				return
			}
			// The one-argument form (PostgreSQL 13 has no timeout
			// argument): the loop looks again until they are gone.
			for _, pid := range pids {
				if _, err := db.Pool.Exec(ctx, `SELECT pg_terminate_backend($1)`, pid); err != nil {
					t.Fatalf("terminate the killed relay's backend %d: %v", pid, err)
				}
			}
			time.Sleep(20 * time.Millisecond)
			if time.Now().After(deadline) {
				t.Fatalf("the killed relay's marks %v still wait after 30s", pids)
			}
		}
	}
	var waiting bool
	waitUntil(t, 30*time.Second, p, "mark waiting for the test's row locks", func() bool {
		if err := db.Pool.QueryRow(ctx, `SELECT EXISTS (`+waitingMarks+`)`).Scan(&waiting); err != nil {
			t.Fatal(err)
		}
		return waiting
	})
	return release
}

// killRounds is OUTBOX_KILL_ROUNDS, default 20.
func killRounds(t *testing.T) int {
	t.Helper()
	v := os.Getenv("OUTBOX_KILL_ROUNDS")
	if v == "" {
		return 20
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("OUTBOX_KILL_ROUNDS is %q: expected a positive integer", v)
	}
	return n
}

// buildRelayBinary builds cmd/outbox-relay into a directory of the test and
// returns its path.
func buildRelayBinary(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		t.Fatalf("go env GOMOD: the test does not run inside the module")
	}
	bin := filepath.Join(t.TempDir(), "outbox-relay")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/outbox-relay")
	cmd.Dir = filepath.Dir(gomod)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("go build ./cmd/outbox-relay: %v\n%s", err, out)
	}
	return bin
}

// relayProcessEnv is the environment of `outbox-relay run` for db and k: the
// test's own environment without any OUTBOX_* variable, plus the relay's.
// Batches are small, so that kills land in every window of the protocol.
func relayProcessEnv(db *testenv.DB, k *testenv.Kafka, relayName, checkpointTopic string) []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			env = append(env, kv)
		}
	}
	return append(env,
		"OUTBOX_DATABASE_URL="+db.URL,
		"OUTBOX_KAFKA_BROKERS="+strings.Join(k.Brokers, ","),
		"OUTBOX_RELAY_NAME="+relayName,
		"OUTBOX_CHECKPOINT_TOPIC="+checkpointTopic,
		"OUTBOX_BATCH_SIZE=50",
		"OUTBOX_POLL_INTERVAL=100ms",
		"OUTBOX_REBALANCE_INTERVAL=100ms",
		// An empty OUTBOX_METRICS_ADDR still serves on :9090 (the default
		// wins over an empty value), so take any free loopback port.
		"OUTBOX_METRICS_ADDR=127.0.0.1:0",
		"OUTBOX_KAFKA_TRANSACTION_TIMEOUT_MS=10000",
		"OUTBOX_SHUTDOWN_TIMEOUT=20s",
		"OUTBOX_LOG_LEVEL=info",
	)
}

// relayLogs gathers the output of every relay process of a test in one file,
// kept (and its path logged) when the test fails.
type relayLogs struct {
	mu   sync.Mutex
	f    *os.File
	runs int
}

func newRelayLogs(t *testing.T, name string) *relayLogs {
	t.Helper()
	dir, err := os.MkdirTemp("", "outbox-relay-"+name+"-")
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Create(filepath.Join(dir, "relay.log"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Close()
		if t.Failed() {
			t.Logf("relay logs kept in %s (each line is prefixed with its run number)", f.Name())
			return
		}
		os.RemoveAll(dir)
	})
	return &relayLogs{f: f}
}

// processLog is the stdout and stderr of one relay process: each whole line
// goes to the shared file, prefixed with the run number, and is kept parsed.
type processLog struct {
	logs    *relayLogs
	run     int
	mu      sync.Mutex
	partial []byte
	lines   []string
	entries []map[string]any // the lines that are JSON objects
}

func (l *processLog) Write(b []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.partial = append(l.partial, b...)
	for {
		i := bytes.IndexByte(l.partial, '\n')
		if i < 0 {
			break
		}
		l.addLine(string(l.partial[:i]))
		l.partial = l.partial[i+1:]
	}
	return len(b), nil
}

func (l *processLog) addLine(line string) {
	l.lines = append(l.lines, line)
	var e map[string]any
	if json.Unmarshal([]byte(line), &e) == nil {
		l.entries = append(l.entries, e)
	}
	l.logs.mu.Lock()
	fmt.Fprintf(l.logs.f, "run %02d: %s\n", l.run, line)
	l.logs.mu.Unlock()
}

// find returns the JSON log entries whose msg is msg.
func (l *processLog) find(msg string) []map[string]any {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []map[string]any
	for _, e := range l.entries {
		if e["msg"] == msg {
			out = append(out, e)
		}
	}
	return out
}

// text is the process's output so far (its last 60 lines), for failure
// messages.
func (l *processLog) text() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	lines := l.lines
	if len(lines) > 60 {
		lines = lines[len(lines)-60:]
	}
	return fmt.Sprintf("output of relay run %d (last %d lines):\n%s%s", l.run, len(lines), strings.Join(lines, "\n"), "\n"+string(l.partial))
}

// sumField adds up the numeric field name of entries.
func sumField(entries []map[string]any, name string) int64 {
	var n int64
	for _, e := range entries {
		if v, ok := e[name].(float64); ok {
			n += int64(v)
		}
	}
	return n
}

// relayProcess is `outbox-relay run` running as an OS process in its own
// process group.
type relayProcess struct {
	cmd  *exec.Cmd
	log  *processLog
	done chan struct{} // closed when Wait has returned
}

func startRelayProcess(t *testing.T, bin string, env []string, logs *relayLogs) *relayProcess {
	t.Helper()
	logs.mu.Lock()
	logs.runs++
	pl := &processLog{logs: logs, run: logs.runs}
	logs.mu.Unlock()
	cmd := exec.Command(bin, "run")
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = pl, pl
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s run: %v", bin, err)
	}
	p := &relayProcess{cmd: cmd, log: pl, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait() // the exit status is in cmd.ProcessState
		close(p.done)
	}()
	t.Cleanup(func() {
		if !p.exited() {
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			<-p.done
		}
	})
	return p
}

func (p *relayProcess) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// state is the exit status; call it only once the process has exited.
func (p *relayProcess) state() *os.ProcessState { return p.cmd.ProcessState }

// signal sends sig to the process group.
func (p *relayProcess) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(-p.cmd.Process.Pid, sig); err != nil && !errors.Is(err, syscall.ESRCH) {
		t.Fatalf("kill -%d the relay's process group: %v", sig, err)
	}
}

// kill sends SIGKILL to the process group and waits for the exit.
func (p *relayProcess) kill(t *testing.T) {
	t.Helper()
	p.signal(t, syscall.SIGKILL)
	p.wait(t, 10*time.Second)
}

// wait waits for the process to exit and returns its status.
func (p *relayProcess) wait(t *testing.T, timeout time.Duration) *os.ProcessState {
	t.Helper()
	select {
	case <-p.done:
		return p.cmd.ProcessState
	case <-time.After(timeout):
		t.Fatalf("the relay did not exit within %v\n%s", timeout, p.log.text())
		return nil
	}
}

func killedBySIGKILL(st *os.ProcessState) bool {
	ws, ok := st.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

// waitUntil polls cond until it holds, failing the test after timeout or as
// soon as the relay process exits.
func waitUntil(t *testing.T, timeout time.Duration, p *relayProcess, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if p.exited() {
			t.Fatalf("the relay exited (%v) while waiting for %s\n%s", p.state(), what, p.log.text())
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within %v\n%s", what, timeout, p.log.text())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// loadWriter inserts small multi-row transactions through outbox.Table.Write,
// keys cycling over a list, until stopped. It is the only writer of its table
// while it runs, so that the table holds exactly the rows it committed.
type loadWriter struct {
	stopc chan struct{}
	done  chan struct{}
	once  sync.Once
	rows  atomic.Int64
	err   error
}

func startLoadWriter(t *testing.T, db *testenv.DB, topic string, keys []string, pause time.Duration) *loadWriter {
	t.Helper()
	w := &loadWriter{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		next := 0
		for tx := 0; ; tx++ {
			select {
			case <-w.stopc:
				return
			case <-time.After(pause):
			}
			msgs := make([]outbox.Message, 1+rand.IntN(6))
			for i := range msgs {
				msgs[i] = outbox.Message{
					Topic:   topic,
					Key:     []byte(keys[next%len(keys)]),
					Value:   fmt.Appendf(nil, `{"tx":%d,"n":%d}`, tx, next),
					Headers: map[string]string{"writer": "load"},
				}
				next++
			}
			// Not cancelled by stop: a commit cut off by a cancellation
			// would leave the row count in doubt.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.Write(ctx, tx, msgs...) })
			cancel()
			if err != nil {
				w.err = err
				return
			}
			w.rows.Add(int64(len(msgs)))
		}
	}()
	return w
}

// burst commits n rows of topic in one transaction, counted with the
// writer's rows.
func (w *loadWriter) burst(t *testing.T, db *testenv.DB, topic string, n int) {
	t.Helper()
	msgs := make([]outbox.Message, n)
	for i := range msgs {
		msgs[i] = outbox.Message{Topic: topic, Key: []byte(fmt.Sprintf("burst-%d", i%7)), Value: fmt.Appendf(nil, `{"burst":%d}`, i)}
	}
	ctx := context.Background()
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.Write(ctx, tx, msgs...) }); err != nil {
		t.Fatalf("burst of %d rows: %v", n, err)
	}
	w.rows.Add(int64(n))
}

// halt stops the writer without checking it (deferred, for early failures).
func (w *loadWriter) halt() {
	w.once.Do(func() { close(w.stopc) })
	<-w.done
}

// stop stops the writer and returns how many rows it committed.
func (w *loadWriter) stop(t *testing.T) int64 {
	t.Helper()
	w.halt()
	if w.err != nil {
		t.Fatalf("writer: %v", w.err)
	}
	return w.rows.Load()
}

func loadKeys(n int) []string {
	keys := make([]string, n)
	for i := range keys {
		keys[i] = fmt.Sprintf("acct-%02d", i)
	}
	return keys
}

// recordDeletedIDs installs a trigger that records the id of every row
// deleted from the outbox in outbox_deleted_ids, and returns a count of
// them: what stands for the published rows in delete mode.
func recordDeletedIDs(t *testing.T, db *testenv.DB) func(*testing.T, *testenv.DB) int64 {
	t.Helper()
	if _, err := db.Pool.Exec(context.Background(), `CREATE TABLE outbox_deleted_ids (id bigint PRIMARY KEY);
CREATE FUNCTION outbox_record_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO outbox_deleted_ids (id) VALUES (OLD.id); RETURN OLD; END $$;
CREATE TRIGGER outbox_record_deleted AFTER DELETE ON outbox FOR EACH ROW EXECUTE FUNCTION outbox_record_deleted();
GRANT ALL ON outbox_deleted_ids TO PUBLIC`); err != nil {
		t.Fatal(err)
	}
	return func(t *testing.T, db *testenv.DB) int64 {
		t.Helper()
		var n int64
		if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_deleted_ids`).Scan(&n); err != nil {
			t.Fatal(err)
		}
		return n
	}
}

// deletedIDs returns the ids recordDeletedIDs recorded, in order.
func deletedIDs(t *testing.T, db *testenv.DB) []int64 {
	t.Helper()
	rows, err := db.Pool.Query(context.Background(), `SELECT id FROM outbox_deleted_ids ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

func countPublished(t *testing.T, db *testenv.DB) int64 {
	t.Helper()
	var n int64
	if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox WHERE published_at IS NOT NULL`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

func deadLetters(t *testing.T, db *testenv.DB) int64 {
	t.Helper()
	var n int64
	if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_dead_letter`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// outboxIDs returns the ids of the outbox rows matching where (all when
// empty), in id order.
func outboxIDs(t *testing.T, db *testenv.DB, where string) []int64 {
	t.Helper()
	q := `SELECT id FROM outbox`
	if where != "" {
		q += ` WHERE ` + where
	}
	rows, err := db.Pool.Query(context.Background(), q+` ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		t.Fatal(err)
	}
	return ids
}

// abortedWork reads topic with read_uncommitted, which also returns the
// records of aborted transactions, and returns how many records more than
// the committed ones it holds, and how many ids appear more than once.
func abortedWork(t *testing.T, k *testenv.Kafka, topic string, committed int) (aborted, republished int) {
	t.Helper()
	cl, err := kgo.NewClient(
		kgo.SeedBrokers(k.Brokers...),
		kgo.ConsumeTopics(topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()),
		kgo.FetchIsolationLevel(kgo.ReadUncommitted()),
		kgo.FetchMaxWait(200*time.Millisecond),
	)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	count := map[string]int{}
	total := 0
	deadline := time.Now().Add(60 * time.Second)
	for time.Now().Before(deadline) {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		fs := cl.PollFetches(ctx)
		cancel()
		n := 0
		fs.EachRecord(func(r *kgo.Record) {
			n++
			for _, h := range r.Headers {
				if h.Key == "outbox-id" {
					count[string(h.Value)]++
				}
			}
		})
		total += n
		if n == 0 && total >= committed {
			break
		}
	}
	for _, c := range count {
		if c > 1 {
			republished++
		}
	}
	return total - committed, republished
}
