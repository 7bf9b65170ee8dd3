package integration

// Kafka errors, class by class: each test injects one error class with
// kfake's ControlKey (a broker answer with the error code set, built from the
// request) and checks the relay's reaction, then that no row was lost or
// published twice. The classes are the README's: retriable, abortable,
// fenced, fatal for a record, fatal for the relay. Commit outcome unknown is
// TestCommitOutcomeUnknown in faults_test.go.
//
// Every test here needs kfake's controls: with KAFKA_BROKERS set they skip.

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// TestInjectedRetriableProduceErrorsAreRetriedExactlyOnce: produce requests
// answered NOT_LEADER_OR_FOLLOWER, then REQUEST_TIMED_OUT, are retried by
// the producer inside the open transaction: no batch aborts, nothing is
// dead-lettered, every row arrives once.
func TestInjectedRetriableProduceErrorsAreRetriedExactlyOnce(t *testing.T) {
	modesNeedControl(t, "NOT_LEADER_OR_FOLLOWER and REQUEST_TIMED_OUT on Produce")
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 40, faultsKeys)

	notLeader := modesInject(t, k, kmsg.Produce, 3, modesProduceFailing(t, k, topic, kerr.NotLeaderForPartition))
	timedOut := modesInject(t, k, kmsg.Produce, 3, modesProduceFailing(t, k, topic, kerr.RequestTimedOut))
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg),
		// NOT_LEADER_OR_FOLLOWER makes the producer refresh metadata
		// before it retries, at most every 5 s by default: shortened to
		// keep the test quick.
		relay.WithKafkaOptions(kgo.MetadataMinAge(100*time.Millisecond)))

	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
	if notLeader.Fired() != 3 || timedOut.Fired() != 3 {
		t.Fatalf("faults fired %d (NOT_LEADER_OR_FOLLOWER) and %d (REQUEST_TIMED_OUT) times, want 3 each", notLeader.Fired(), timedOut.Fired())
	}
	if got := faultsMetric(t, reg, "outbox_relay_transaction_aborts_total"); got != 0 {
		t.Errorf("%v batches aborted: a retriable error must be retried inside the transaction", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_dead_letters_total"); got != 0 {
		t.Errorf("%v rows dead-lettered for a retriable error", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != float64(len(ids)) {
		t.Errorf("published_records_total = %v, want %d", got, len(ids))
	}
	if n := len(faultsReadUncommitted(t, k.Brokers, topic, len(ids), 10*time.Second)); n != len(ids) {
		t.Errorf("read_uncommitted sees %d records for %d rows", n, len(ids))
	}
}

// TestInjectedAbortableErrorAbortsAndRepublishesExactlyOnce: a batch that
// cannot commit (TRANSACTION_ABORTABLE on a produce, or on the commit
// itself) is aborted; the relay recovers, publishes the rows again in a new
// transaction, and counts the abort. Recovery marks nothing from the
// checkpoint, as nothing committed.
func TestInjectedAbortableErrorAbortsAndRepublishesExactlyOnce(t *testing.T) {
	modesNeedControl(t, "TRANSACTION_ABORTABLE on Produce and EndTxn")
	cases := []struct {
		name   string
		key    kmsg.Key
		reason string // of outbox_relay_transaction_aborts_total
		// aborted: the aborted transaction holds a copy of every row, so
		// read_uncommitted sees each row twice.
		aborted bool
		answer  func(t *testing.T, k *testenv.Kafka, topic string) func(kmsg.Request) kmsg.Response
	}{
		{"TRANSACTION_ABORTABLE on Produce", kmsg.Produce, "aborted", false,
			func(t *testing.T, k *testenv.Kafka, topic string) func(kmsg.Request) kmsg.Response {
				return modesProduceFailing(t, k, topic, kerr.TransactionAbortable)
			}},
		// The broker says it did not commit; the relay does not take its
		// word for it, it recovers (commit_unknown) and the checkpoint
		// shows nothing committed.
		{"TRANSACTION_ABORTABLE on EndTxn", kmsg.EndTxn, "commit_unknown", true,
			func(*testing.T, *testenv.Kafka, string) func(kmsg.Request) kmsg.Response {
				return modesEndTxnFailing(kerr.TransactionAbortable)
			}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			ids := db.Insert(t, topic, 30, faultsKeys)
			fault := modesInject(t, k, c.key, 1, c.answer(t, k, topic))
			reg := prometheus.NewRegistry()
			logs := &testenv.SyncBuffer{}
			testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))

			testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
			faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
			if fault.Fired() != 1 {
				t.Fatalf("the fault fired %d times, want 1", fault.Fired())
			}
			if got := faultsMetric(t, reg, "outbox_relay_transaction_aborts_total", "reason", c.reason); got != 1 {
				t.Errorf("transaction_aborts_total{reason=%q} = %v, want 1", c.reason, got)
			}
			if !faultsLogHas(logs.String(), `"level":"WARN"`, "shard recovering after error", "TRANSACTION_ABORTABLE") {
				t.Error("no WARN line says the shard recovers after TRANSACTION_ABORTABLE")
			}
			if got := faultsMetric(t, reg, "outbox_relay_recoveries_total"); got != 2 {
				t.Errorf("recoveries_total = %v, want 2 (start, and after the abort)", got)
			}
			if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != 0 {
				t.Errorf("recovery marked %v rows of a transaction that never committed", got)
			}
			if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != float64(len(ids)) {
				t.Errorf("published_records_total = %v, want %d", got, len(ids))
			}
			if c.aborted {
				if n := len(faultsReadUncommitted(t, k.Brokers, topic, 2*len(ids), 10*time.Second)); n != 2*len(ids) {
					t.Errorf("read_uncommitted sees %d records, want %d (the aborted copy and the committed one)", n, 2*len(ids))
				}
			}
		})
	}
}

// TestInjectedProducerFencedGivesTheShardUp: the commit is answered
// PRODUCER_FENCED. The relay stops writing the shard, says so and counts it;
// its ownership loop takes the shard again, recovery (a new InitProducerID)
// aborts the fenced transaction, and every row is published once.
func TestInjectedProducerFencedGivesTheShardUp(t *testing.T) {
	modesNeedControl(t, "PRODUCER_FENCED on EndTxn")
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)
	fault := modesInject(t, k, kmsg.EndTxn, 1, modesEndTxnFailing(kerr.ProducerFenced))
	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	r := testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))

	faultsEventually(t, 30*time.Second, "the relay counts the fencing", func() bool {
		return faultsMetric(t, reg, "outbox_relay_fenced_total") == 1
	})
	fault.Stop()
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "fenced", "PRODUCER_FENCED") {
		t.Error("no ERROR line says the relay was fenced")
	}

	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
	if n := strings.Count(logs.String(), `"msg":"shard taken"`); n != 2 {
		t.Errorf("the shard was taken %d times, want 2 (given up when fenced, taken again)", n)
	}
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != 0 {
		t.Errorf("recovery marked %v rows of the fenced transaction", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != float64(len(ids)) {
		t.Errorf("published_records_total = %v, want %d", got, len(ids))
	}
	if got := faultsMetric(t, reg, "outbox_relay_fenced_total"); got != 1 {
		t.Errorf("fenced_total = %v, want 1", got)
	}
	if !r.Relay.Ready() {
		t.Error("the relay stopped: a fencing gives the shard up, not the process")
	}
	if n := len(faultsReadUncommitted(t, k.Brokers, topic, 2*len(ids), 10*time.Second)); n != 2*len(ids) {
		t.Errorf("read_uncommitted sees %d records, want %d (the fenced, aborted copy and the committed one)", n, 2*len(ids))
	}
}

// TestInjectedRecordFatalErrorIsDeadLetteredInExactlyOnceMode: Kafka
// refuses one row for a reason of its own (INVALID_TOPIC_EXCEPTION on the
// row's topic; MESSAGE_TOO_LARGE on the record batch holding the row, which
// refuses its batch-mates with it). The relay aborts, bisects the batch until
// the row stands alone, moves it to the dead-letter table with Kafka's error,
// and publishes every other row once, in order.
func TestInjectedRecordFatalErrorIsDeadLetteredInExactlyOnceMode(t *testing.T) {
	modesNeedControl(t, "INVALID_TOPIC_EXCEPTION and MESSAGE_TOO_LARGE on Produce")
	t.Run("INVALID_TOPIC_EXCEPTION on the row's topic", func(t *testing.T) {
		modesRecordFatal(t, txn.ExactlyOnce, kerr.InvalidTopicException, true)
	})
	t.Run("MESSAGE_TOO_LARGE on the row's record batch", func(t *testing.T) {
		modesRecordFatal(t, txn.ExactlyOnce, kerr.MessageTooLarge, false)
	})
}

// TestAtLeastOnceInjectedRecordFatalErrorDeadLettersOnlyTheCulprit: the
// same in at-least-once mode, where there is no transaction to bisect: the
// refused rows are sent again one by one, the culprit alone is
// dead-lettered, and its batch-mates are published once.
func TestAtLeastOnceInjectedRecordFatalErrorDeadLettersOnlyTheCulprit(t *testing.T) {
	modesNeedControl(t, "INVALID_TOPIC_EXCEPTION and MESSAGE_TOO_LARGE on Produce")
	t.Run("INVALID_TOPIC_EXCEPTION on the row's topic", func(t *testing.T) {
		modesRecordFatal(t, txn.AtLeastOnce, kerr.InvalidTopicException, true)
	})
	t.Run("MESSAGE_TOO_LARGE on the row's record batch", func(t *testing.T) {
		modesRecordFatal(t, txn.AtLeastOnce, kerr.MessageTooLarge, false)
	})
}

// modesRecordFatal writes 40 rows, the 21st of them the culprit, and has
// Kafka refuse the culprit with code: on its own topic (ownTopic), or on the
// record batch holding it, which shares its partition with other rows.
func modesRecordFatal(t *testing.T, mode txn.Mode, code *kerr.Error, ownTopic bool) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic, poison := testenv.RandomName("payments-"), testenv.RandomName("poison-")
	k := testenv.NewKafka(t, 3, topic, poison)
	good := db.Insert(t, topic, 20, faultsKeys)
	var bad int64
	if ownTopic {
		bad = db.Insert(t, poison, 1, []string{"poison"})[0]
	} else {
		bad = db.Insert(t, topic, 1, faultsKeys[:1])[0]
	}
	good = append(good, db.Insert(t, topic, 19, faultsKeys)...)

	var answer func(kmsg.Request) kmsg.Response
	if ownTopic {
		answer = modesProduceFailing(t, k, poison, code)
	} else {
		answer = modesProduceFailingRecord(bad, code)
	}
	fault := modesInject(t, k, kmsg.Produce, -1, answer)
	cfg := testenv.RelayConfig(db, k)
	cfg.Delivery = string(mode)
	// Isolation alone: under hold-key (the default) the culprit would hold
	// the later rows of its key (TestDeadLetterFromTheRecordErrorSplitHoldsItsKey).
	cfg.DeadLetterOrder = "skip"
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))

	st := outbox.NewStore(db.Pool, db.Table)
	faultsEventually(t, 30*time.Second, "the culprit is dead-lettered and every other row marked", func() bool {
		dead, err := st.ListDeadLetters(ctx, 10)
		return err == nil && len(dead) > 0 && db.Unpublished(t) == 0
	})
	testenv.CheckExactlyOnce(t, good, k.NewConsumer(t, topic, poison).WaitFor(t, len(good), 30*time.Second))
	dead, err := st.ListDeadLetters(ctx, 10)
	if err != nil {
		t.Fatal(err)
	}
	wantTopic := topic
	if ownTopic {
		wantTopic = poison
	}
	if len(dead) != 1 || dead[0].ID != bad || dead[0].Topic != wantTopic || !strings.Contains(dead[0].Error, code.Message) {
		t.Fatalf("dead letters = %+v, want only row %d of topic %s with %s", dead, bad, wantTopic, code.Message)
	}
	var total int
	if err := db.Pool.QueryRow(ctx, `SELECT (SELECT count(*) FROM outbox) + (SELECT count(*) FROM outbox_dead_letter)`).Scan(&total); err != nil {
		t.Fatal(err)
	}
	if total != len(good)+1 {
		t.Fatalf("outbox + dead letters hold %d rows, wrote %d: a row was lost", total, len(good)+1)
	}
	if got := faultsMetric(t, reg, "outbox_relay_dead_letters_total"); got != 1 {
		t.Errorf("dead_letters_total = %v, want 1", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_published_records_total"); got != float64(len(good)) {
		t.Errorf("published_records_total = %v, want %d", got, len(good))
	}
	t.Logf("the culprit's produce was refused %d times; record_error aborts: %v", fault.Fired(),
		faultsMetric(t, reg, "outbox_relay_transaction_aborts_total", "reason", "record_error"))
	// Refused with its batch, then alone: the relay never dead-letters a row
	// that was refused only for its batch-mates' sake. (Alone on its own
	// topic in at-least-once mode, it was refused alone at once.)
	if fault.Fired() < 2 && !(mode == txn.AtLeastOnce && ownTopic) {
		t.Errorf("the culprit was refused %d times, want at least 2 (with its batch, then alone)", fault.Fired())
	}
	if mode == txn.ExactlyOnce {
		if got := faultsMetric(t, reg, "outbox_relay_transaction_aborts_total", "reason", "record_error"); got < 2 {
			t.Errorf("record_error aborts = %v, want at least 2: the batch was not bisected", got)
		}
	}
}

// TestInjectedAuthorizationFailureIsFatalForTheRelay: a cluster that denies
// the relay (TRANSACTIONAL_ID_AUTHORIZATION_FAILED for the transactional
// producer, CLUSTER_AUTHORIZATION_FAILED for the idempotent one) stops it:
// Run returns an error wrapping txn.ErrFatal that names the cause, and no row
// is marked or sent.
func TestInjectedAuthorizationFailureIsFatalForTheRelay(t *testing.T) {
	modesNeedControl(t, "authorization failures on InitProducerID")
	cases := []struct {
		mode txn.Mode
		code *kerr.Error
	}{
		{txn.ExactlyOnce, kerr.TransactionalIDAuthorizationFailed},
		{txn.AtLeastOnce, kerr.ClusterAuthorizationFailed},
	}
	for _, c := range cases {
		t.Run(string(c.mode)+" "+c.code.Message, func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			ids := db.Insert(t, topic, 20, faultsKeys)
			fault := modesInject(t, k, kmsg.InitProducerID, -1, func(req kmsg.Request) kmsg.Response {
				resp := req.ResponseKind().(*kmsg.InitProducerIDResponse)
				resp.ErrorCode = c.code.Code
				return resp
			})
			cfg := testenv.RelayConfig(db, k)
			cfg.Delivery = string(c.mode)
			logs := &testenv.SyncBuffer{}
			r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)))

			err := r.Wait(t, 30*time.Second)
			if !errors.Is(err, txn.ErrFatal) || !errors.Is(err, c.code) || !strings.Contains(err.Error(), c.code.Message) {
				t.Fatalf("Run returned %v, want an error wrapping txn.ErrFatal and %s", err, c.code.Message)
			}
			if fault.Fired() == 0 {
				t.Fatal("the fault never fired")
			}
			if !faultsLogHas(logs.String(), `"level":"ERROR"`, "shard stopped", c.code.Message) {
				t.Errorf("no ERROR line says the shard stopped on %s", c.code.Message)
			}
			if n := db.Unpublished(t); n != len(ids) {
				t.Errorf("%d rows marked by a relay Kafka denied", len(ids)-n)
			}
			ends, err := k.Admin(t).ListEndOffsets(context.Background(), topic)
			if err != nil {
				t.Fatal(err)
			}
			ends.Each(func(o kadm.ListedOffset) {
				if o.Err != nil || o.Offset != 0 {
					t.Errorf("partition %d ends at offset %d (%v): a denied relay wrote to it", o.Partition, o.Offset, o.Err)
				}
			})
		})
	}
}

// modesNeedControl skips the test when it runs against KAFKA_BROKERS: it
// injects broker answers with kfake's ControlKey.
func modesNeedControl(t *testing.T, what string) {
	t.Helper()
	if testenv.RealBrokers() != nil {
		t.Skipf("injecting %s needs kfake's ControlKey; KAFKA_BROKERS is set, so this runs only against the in-process kfake cluster", what)
	}
}

// modesFault is one fault injected with kfake's ControlKey.
type modesFault struct {
	fired   atomic.Int32
	stopped atomic.Bool
}

// Fired is how many requests the fault answered.
func (f *modesFault) Fired() int { return int(f.fired.Load()) }

// Stop removes the fault: the broker answers every later request itself.
func (f *modesFault) Stop() { f.stopped.Store(true) }

// modesInject answers requests of key with answer's response instead of the
// broker's, until it has answered n of them (n < 0: until Stop). A nil
// answer lets the broker handle the request as usual; the fault stays.
func modesInject(t *testing.T, k *testenv.Kafka, key kmsg.Key, n int, answer func(kmsg.Request) kmsg.Response) *modesFault {
	t.Helper()
	f := &modesFault{}
	c := k.Cluster
	c.ControlKey(key.Int16(), func(req kmsg.Request) (kmsg.Response, error, bool) {
		if f.stopped.Load() {
			c.DropControl()
			return nil, nil, false
		}
		resp := answer(req)
		if resp == nil {
			return nil, nil, false // not handled: the control is kept
		}
		// Handled: the control is dropped unless kept, and once kept it
		// stays until dropped.
		if fired := f.fired.Add(1); n >= 0 && int(fired) >= n {
			c.DropControl()
		} else {
			c.KeepControl()
		}
		return resp, nil, true
	})
	t.Cleanup(f.Stop)
	return f
}

// modesProduceFailing answers the produce requests that write to topic: its
// partitions get code, any other partition of the request REQUEST_TIMED_OUT
// (see modesProduceAnswer).
func modesProduceFailing(t *testing.T, k *testenv.Kafka, topic string, code *kerr.Error) func(kmsg.Request) kmsg.Response {
	t.Helper()
	td, err := k.Admin(t).ListTopics(context.Background(), topic)
	if err != nil || td[topic].Err != nil {
		t.Fatalf("topic %s: %v %v", topic, err, td[topic].Err)
	}
	id := [16]byte(td[topic].ID)
	return func(req kmsg.Request) kmsg.Response {
		return modesProduceAnswer(req, func(rt *kmsg.ProduceRequestTopic, _ *kmsg.ProduceRequestTopicPartition) bool {
			return rt.Topic == topic || (rt.TopicID != [16]byte{} && rt.TopicID == id)
		}, code)
	}
}

// modesProduceFailingRecord answers the produce requests holding the record
// of outbox row id: its partition (the whole record batch, as Kafka refuses
// batches) gets code, any other partition REQUEST_TIMED_OUT.
func modesProduceFailingRecord(id int64, code *kerr.Error) func(kmsg.Request) kmsg.Response {
	// The record header as it is on the wire (uncompressed batches):
	// key, then the value's length as a zig-zag varint, then the value.
	v := strconv.FormatInt(id, 10)
	header := binary.AppendVarint([]byte(txn.HeaderOutboxID), int64(len(v)))
	header = append(header, v...)
	return func(req kmsg.Request) kmsg.Response {
		return modesProduceAnswer(req, func(_ *kmsg.ProduceRequestTopic, p *kmsg.ProduceRequestTopicPartition) bool {
			return bytes.Contains(p.Records, header)
		}, code)
	}
}

// modesProduceAnswer builds the answer to a produce request: code for the
// partitions hit selects; nil (let the broker answer) when hit selects none.
// The request's other partitions are not written either, so they are
// answered REQUEST_TIMED_OUT, never success: the producer sends them again
// after its backoff (without waiting for a metadata refresh, as
// NOT_LEADER_OR_FOLLOWER would), and its sequence numbers make that safe.
func modesProduceAnswer(req kmsg.Request, hit func(*kmsg.ProduceRequestTopic, *kmsg.ProduceRequestTopicPartition) bool, code *kerr.Error) kmsg.Response {
	preq := req.(*kmsg.ProduceRequest)
	resp := preq.ResponseKind().(*kmsg.ProduceResponse)
	matched := false
	for i := range preq.Topics {
		rt := &preq.Topics[i]
		st := kmsg.NewProduceResponseTopic()
		st.Topic, st.TopicID = rt.Topic, rt.TopicID
		for j := range rt.Partitions {
			rp := &rt.Partitions[j]
			sp := kmsg.NewProduceResponseTopicPartition()
			sp.Partition, sp.BaseOffset = rp.Partition, -1
			sp.ErrorCode = kerr.RequestTimedOut.Code
			if hit(rt, rp) {
				sp.ErrorCode, matched = code.Code, true
			}
			st.Partitions = append(st.Partitions, sp)
		}
		resp.Topics = append(resp.Topics, st)
	}
	if !matched {
		return nil
	}
	return resp
}

// modesEndTxnFailing answers EndTxn with code; the broker never sees it,
// so the transaction stays open until the next InitProducerID of its id.
func modesEndTxnFailing(code *kerr.Error) func(kmsg.Request) kmsg.Response {
	return func(req kmsg.Request) kmsg.Response {
		resp := req.ResponseKind().(*kmsg.EndTxnResponse)
		resp.ErrorCode = code.Code
		return resp
	}
}
