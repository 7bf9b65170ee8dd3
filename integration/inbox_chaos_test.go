package integration

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/demo"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/txn"
)

// TestInboxChaosTwoConsumersDuplicatesAndForeignRecords: two demo-ledger
// processes (package inbox) share one consumer group while writers commit
// transfers and the relay publishes them. Every ~2 s (8 rounds) one of them is killed
// with SIGKILL and started again, or frozen with SIGSTOP for 3 s and let go;
// meanwhile an injector puts on the topic copies of published transfers, as
// the relay sends them (outbox-id and outbox-event-id), in committed Kafka
// transactions, in aborted ones and without a transaction, on any
// partition, and foreign records (no outbox-id) that look like transfers.
// At the end every transfer is applied once (the ledger's balances equal
// the source's, two entries a transfer), the applied table lists exactly
// the outbox's events, and the inbox's dead letters are exactly the foreign
// records.
func TestInboxChaosTwoConsumersDuplicatesAndForeignRecords(t *testing.T) {
	bin := buildRelayBinary(t)
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	const partitions = 6
	k := testenv.NewKafka(t, partitions, topic)
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
	group := testenv.RandomName("ledger-")
	args := func(n int) []string {
		return []string{"demo-ledger", "-schema", "ledger", "-kafka", strings.Join(k.Brokers, ","), "-topic", topic,
			"-group", group, "-instance-id", "ledger-" + strconv.Itoa(n), "-accounts", strconv.Itoa(accounts), "-batch", "20"}
	}
	logs := newRelayLogs(t, "inbox-chaos")
	procs := [2]*relayProcess{startLedgerProcess(t, bin, args(0), env, logs), nil}
	// One at a time: the first creates the ledger's schema.
	waitUntil(t, 60*time.Second, procs[0], `"inbox: partition assigned"`, func() bool { return len(procs[0].log.find("inbox: partition assigned")) > 0 })
	procs[1] = startLedgerProcess(t, bin, args(1), env, logs)

	inj := startInjector(t, db, k, topic, partitions)
	var kills, stops int
	for round := range 8 {
		time.Sleep(time.Duration(1500+rand.IntN(1000)) * time.Millisecond)
		n := rand.IntN(2)
		p := procs[n]
		if p.exited() {
			t.Fatalf("round %d: ledger %d exited on its own: %v\n%s", round, n, p.state(), p.log.text())
		}
		if round%3 == 2 {
			p.signal(t, syscall.SIGSTOP)
			time.Sleep(3 * time.Second)
			p.signal(t, syscall.SIGCONT)
			stops++
			continue
		}
		p.kill(t)
		kills++
		procs[n] = startLedgerProcess(t, bin, args(n), env, logs)
	}
	injected := inj.stop(t)
	written := w.stop(t)

	waitUntil(t, 90*time.Second, procs[0], "the ledger to apply every transfer", func() bool { return ledgerAppliedCount(t, db) >= written })
	time.Sleep(2 * time.Second) // a duplicate would be applied now
	for n, p := range procs {
		p.signal(t, syscall.SIGTERM)
		if st := p.wait(t, 40*time.Second); st.ExitCode() != 0 {
			t.Fatalf("after SIGTERM ledger %d exited with %v, want exit code 0\n%s", n, st, p.log.text())
		}
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
	var unmatched, applied, deadLetters, foreignDead int64
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM outbox o FULL JOIN ledger.ledger_inbox_applied a ON a.event_id = o.event_id AND a.topic = o.topic
WHERE a.event_id IS NULL OR o.event_id IS NULL`).Scan(&unmatched); err != nil {
		t.Fatal(err)
	}
	if err := db.Pool.QueryRow(ctx, `SELECT count(*) FROM ledger.ledger_inbox_applied`).Scan(&applied); err != nil {
		t.Fatal(err)
	}
	if err := db.Pool.QueryRow(ctx, `SELECT count(*), count(*) FILTER (WHERE outbox_id IS NULL) FROM ledger.ledger_inbox_dead_letter`).Scan(&deadLetters, &foreignDead); err != nil {
		t.Fatal(err)
	}
	if unmatched != 0 || applied != written {
		t.Errorf("the inbox's applied table has %d events for %d transfers, and differs from the outbox in %d event ids", applied, written, unmatched)
	}
	if deadLetters != injected.foreign || foreignDead != injected.foreign {
		t.Errorf("%d dead letters (%d without an outbox-id), want exactly the %d foreign records", deadLetters, foreignDead, injected.foreign)
	}
	t.Logf("%d transfers; %d kills, %d SIGSTOPs of a consumer; injected %d committed, %d aborted, %d non-transactional copies and %d foreign records",
		written, kills, stops, injected.committed, injected.aborted, injected.plain, injected.foreign)
	if injected.committed == 0 || injected.aborted == 0 || injected.plain == 0 || injected.foreign == 0 {
		t.Errorf("the injector did not inject every kind: %+v", injected)
	}
}

// injected counts what an injector put on the topic.
type injected struct{ committed, aborted, plain, foreign int64 }

// injector puts copies of published outbox rows (as the relay sends them)
// and foreign records on a topic until stopped.
type injector struct {
	stopc chan struct{}
	done  chan struct{}
	n     injected
	err   error
	once  sync.Once
}

func startInjector(t *testing.T, db *testenv.DB, k *testenv.Kafka, topic string, partitions int) *injector {
	t.Helper()
	tx, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()),
		kgo.TransactionalID(testenv.RandomName("injector-")))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tx.Close)
	plain, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plain.Close)
	in := &injector{stopc: make(chan struct{}), done: make(chan struct{})}
	go func() {
		defer close(in.done)
		ctx := context.Background()
		for i := 0; ; i++ {
			select {
			case <-in.stopc:
				return
			case <-time.After(150 * time.Millisecond):
			}
			if err := in.inject(ctx, db, tx, plain, i, partitions); err != nil {
				in.err = err
				return
			}
		}
	}()
	return in
}

func (in *injector) inject(ctx context.Context, db *testenv.DB, tx, plain *kgo.Client, i, partitions int) error {
	part := int32(rand.IntN(partitions))
	if i%4 == 3 {
		value := fmt.Sprintf(`{"transfer_id":%d,"from":1,"to":2,"amount":1000000}`, 1+i)
		r := &kgo.Record{Key: []byte("1"), Value: []byte(value), Partition: part, Headers: []kgo.RecordHeader{{Key: "type", Value: []byte("transfer")}}}
		if err := plain.ProduceSync(ctx, r).FirstErr(); err != nil {
			return fmt.Errorf("produce a foreign record: %w", err)
		}
		in.n.foreign++
		return nil
	}
	var (
		id         int64
		key, value []byte
		event      string
	)
	err := db.Pool.QueryRow(ctx, `SELECT id, key, value, event_id::text FROM outbox WHERE published_at IS NOT NULL ORDER BY random() LIMIT 1`).Scan(&id, &key, &value, &event)
	if err != nil {
		return nil // nothing published yet
	}
	r := &kgo.Record{Key: key, Value: value, Partition: part, Headers: []kgo.RecordHeader{
		{Key: txn.HeaderOutboxID, Value: []byte(strconv.FormatInt(id, 10))}, {Key: txn.HeaderEventID, Value: []byte(event)}}}
	switch i % 4 {
	case 0, 1:
		commit := i%4 == 0
		if err := tx.BeginTransaction(); err != nil {
			return fmt.Errorf("begin: %w", err)
		}
		if err := tx.ProduceSync(ctx, r).FirstErr(); err != nil {
			return fmt.Errorf("produce a copy in a transaction: %w", err)
		}
		if err := tx.EndTransaction(ctx, kgo.TransactionEndTry(commit)); err != nil {
			return fmt.Errorf("end transaction: %w", err)
		}
		if commit {
			in.n.committed++
		} else {
			in.n.aborted++
		}
	case 2:
		if err := plain.ProduceSync(ctx, r).FirstErr(); err != nil {
			return fmt.Errorf("produce a copy: %w", err)
		}
		in.n.plain++
	}
	return nil
}

func (in *injector) stop(t *testing.T) injected {
	t.Helper()
	in.once.Do(func() { close(in.stopc) })
	<-in.done
	if in.err != nil {
		t.Fatalf("injector: %v", in.err)
	}
	return in.n
}
