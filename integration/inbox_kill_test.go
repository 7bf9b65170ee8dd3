package integration

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/demo"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// TestKillNineOfTheConsumerAppliesEachEventOnce runs the demo's ledger
// service (`outbox-relay demo-ledger`, a consumer on package inbox) as an
// OS process and kills it with SIGKILL again and again
// (OUTBOX_INBOX_KILL_ROUNDS, default 20) while writers commit transfers
// and the relay publishes them. A kill can land inside the ledger's
// database transaction (PostgreSQL rolls it back), between its commit and
// anything else (the next process resumes from the offsets in the
// database, never from Kafka's group offsets), or while it is being
// assigned its partitions. Every restart uses the same static InstanceID,
// as a restarted pod would. A last process drains the topic and is stopped
// with SIGTERM (exit 0). Then the ledger's balances must equal the source's
// account by account, every transfer must be applied once (two entries
// each), and the inbox's applied table must list exactly the outbox ids.
func TestKillNineOfTheConsumerAppliesEachEventOnce(t *testing.T) {
	rounds := roundsFrom(t, "OUTBOX_INBOX_KILL_ROUNDS", 20)
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 6, topic)
	const accounts = 20
	ctx := context.Background()
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE accounts (id integer PRIMARY KEY, balance bigint NOT NULL)`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `INSERT INTO accounts SELECT g, $1 FROM generate_series(1, $2::int) g`, demo.OpeningBalance, accounts); err != nil {
		t.Fatal(err)
	}
	cfg := testenv.RelayConfig(db, k)
	cfg.BatchSize = 50
	cfg.LogLevel = "info"
	testenv.StartRelay(t, db, cfg)
	w := startTransferWriter(t, db, topic, accounts, 3*time.Millisecond)
	defer w.halt()

	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			env = append(env, kv)
		}
	}
	env = append(env, "OUTBOX_DATABASE_URL="+db.URL+"?application_name=ledger-under-test")
	args := []string{"demo-ledger", "-schema", "ledger", "-kafka", strings.Join(k.Brokers, ","), "-topic", topic,
		"-group", testenv.RandomName("ledger-"), "-instance-id", "ledger-0", "-accounts", strconv.Itoa(accounts), "-batch", "20"}
	logs := newRelayLogs(t, "inbox-kill")

	var (
		underLoad  int   // kills while committed transfers were not yet applied
		inTxn      int   // kills while the ledger had a transaction open
		progressed int   // rounds in which the ledger applied something
		lastCount  int64 // applied before the round
	)
	for i := range rounds {
		p := startLedgerProcess(t, bin, args, env, logs)
		// Half the rounds are killed soon after start (during start-up
		// and assignment), half once the partitions are assigned.
		if i%2 == 0 {
			waitUntil(t, 60*time.Second, p, `"inbox: partition assigned"`, func() bool { return len(p.log.find("inbox: partition assigned")) > 0 })
		}
		time.Sleep(time.Duration(100+rand.IntN(500)) * time.Millisecond)
		if p.exited() {
			t.Fatalf("round %d: the ledger exited on its own before the kill: %v\n%s", i, p.state(), p.log.text())
		}
		open := ledgerTransactionOpen(t, db)
		p.kill(t)
		if st := p.state(); !killedBySIGKILL(st) {
			t.Fatalf("round %d: the ledger was not killed by SIGKILL but ended with %v\n%s", i, st, p.log.text())
		}
		applied := ledgerAppliedCount(t, db)
		if w.rows.Load() > applied {
			underLoad++
		}
		if open {
			inTxn++
		}
		if applied > lastCount {
			progressed++
		}
		lastCount = applied
	}

	written := w.stop(t)
	last := startLedgerProcess(t, bin, args, env, logs)
	waitUntil(t, 90*time.Second, last, "the ledger to apply every transfer", func() bool { return ledgerAppliedCount(t, db) >= written })
	time.Sleep(500 * time.Millisecond) // a duplicate would be applied now
	last.signal(t, syscall.SIGTERM)
	if st := last.wait(t, 40*time.Second); st.ExitCode() != 0 {
		t.Fatalf("after SIGTERM the ledger exited with %v, want exit code 0\n%s", st, last.log.text())
	}

	if n := int64(len(outboxIDs(t, db, ""))); n != written {
		t.Fatalf("the writers committed %d transfers, the outbox holds %d", written, n)
	}
	diffs, entries, err := demo.LedgerDiff(ctx, db.Pool, "public.accounts", "ledger")
	if err != nil {
		t.Fatal(err)
	}
	if len(diffs) > 0 {
		t.Errorf("the ledger's balances differ from the source's:\n%s", strings.Join(diffs, "\n"))
	}
	if entries != 2*written {
		t.Errorf("the ledger has %d account entries for %d transfers, want 2 each: transfers were applied twice or not at all", entries, written)
	}
	var unmatched, deadLetters int64
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox o FULL JOIN ledger.ledger_inbox_applied a ON a.outbox_id = o.id AND a.topic = o.topic
WHERE a.outbox_id IS NULL OR o.id IS NULL`).Scan(&unmatched); err != nil {
		t.Fatal(err)
	}
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger.ledger_inbox_dead_letter`).Scan(&deadLetters); err != nil {
		t.Fatal(err)
	}
	if unmatched != 0 || deadLetters != 0 {
		t.Errorf("the inbox's applied table and the outbox differ in %d ids; %d dead letters (none of these events is poison)", unmatched, deadLetters)
	}
	t.Logf("%d kills of the consumer: %d with committed transfers not yet applied, %d with a ledger transaction open, %d rounds applied something; %d transfers written",
		rounds, underLoad, inTxn, progressed, written)
	if underLoad <= rounds/2 {
		t.Errorf("only %d of %d kills happened while transfers waited: the kills did not land under load", underLoad, rounds)
	}
	if progressed == 0 {
		t.Errorf("no round applied anything before its kill: the kills all landed during start-up")
	}
}

// roundsFrom reads a positive round count from the environment variable
// name, or returns def.
func roundsFrom(t *testing.T, name string, def int) int {
	t.Helper()
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 1 {
		t.Fatalf("%s is %q: expected a positive integer", name, v)
	}
	return n
}

// ledgerTransactionOpen reports whether the ledger process has a
// transaction open right now.
func ledgerTransactionOpen(t *testing.T, db *testenv.DB) bool {
	t.Helper()
	var open bool
	err := db.Pool.QueryRow(context.Background(), `SELECT EXISTS (SELECT FROM pg_stat_activity WHERE datname = current_database()
AND application_name = 'ledger-under-test' AND xact_start IS NOT NULL)`).Scan(&open)
	if err != nil {
		t.Fatal(err)
	}
	return open
}

func ledgerAppliedCount(t *testing.T, db *testenv.DB) int64 {
	t.Helper()
	var n int64
	err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM ledger.ledger_inbox_applied`).Scan(&n)
	if err != nil {
		// Not created yet: the first ledger process creates it.
		return 0
	}
	return n
}

// startLedgerProcess starts `outbox-relay` with args (demo-ledger ...) as an
// OS process in its own process group.
func startLedgerProcess(t *testing.T, bin string, args, env []string, logs *relayLogs) *relayProcess {
	t.Helper()
	logs.mu.Lock()
	logs.runs++
	pl := &processLog{logs: logs, run: logs.runs}
	logs.mu.Unlock()
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdout, cmd.Stderr = pl, pl
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatalf("start %s %s: %v", bin, args[0], err)
	}
	p := &relayProcess{cmd: cmd, log: pl, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
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

// transferWriter is the payments application: each transfer is one
// transaction that moves money between two accounts of the accounts table
// (locked in id order) and writes one outbox row, a demo.Transfer.
type transferWriter struct {
	stopc chan struct{}
	done  chan struct{}
	once  sync.Once
	rows  atomic.Int64
	err   error
}

func startTransferWriter(t *testing.T, db *testenv.DB, topic string, accounts int, pause time.Duration) *transferWriter {
	t.Helper()
	w := &transferWriter{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(w.done)
		for id := int64(1); ; id++ {
			select {
			case <-w.stopc:
				return
			case <-time.After(pause):
			}
			from := 1 + rand.IntN(accounts)
			to := 1 + rand.IntN(accounts-1)
			if to >= from {
				to++
			}
			amount := 1 + rand.Int64N(1000)
			value, _ := json.Marshal(demo.Transfer{TransferID: id, From: from, To: to, Amount: amount})
			// Not cancelled by stop: the count of committed transfers
			// must be certain.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
				if _, err := tx.Exec(ctx, `SELECT FROM accounts WHERE id IN ($1, $2) ORDER BY id FOR UPDATE`, from, to); err != nil {
					return err
				}
				if _, err := tx.Exec(ctx, `UPDATE accounts SET balance = balance + CASE WHEN id = $1 THEN -$3::bigint ELSE $3::bigint END WHERE id IN ($1, $2)`,
					from, to, amount); err != nil {
					return err
				}
				return db.Table.Write(ctx, tx, outbox.Message{Topic: topic, Key: []byte(strconv.Itoa(from)), Value: value})
			})
			cancel()
			if err != nil {
				w.err = err
				return
			}
			w.rows.Add(1)
		}
	}()
	return w
}

func (w *transferWriter) halt() {
	w.once.Do(func() { close(w.stopc) })
	<-w.done
}

func (w *transferWriter) stop(t *testing.T) int64 {
	t.Helper()
	w.halt()
	if w.err != nil {
		t.Fatalf("writer: %v", w.err)
	}
	return w.rows.Load()
}
