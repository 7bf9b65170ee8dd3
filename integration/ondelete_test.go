package integration

// OUTBOX_ON_PUBLISH=delete: the relay deletes a row in the statement that
// would have marked it published. These tests prove that every guarantee of
// mark mode holds when rows are deleted instead: each row reaches a
// read_committed consumer once, a crash between the Kafka commit and the
// delete republishes nothing (recovery deletes the rows the checkpoint
// proves), rows that reuse ids after a restore are published and not
// deleted, and verify still checks what it can.

import (
	"context"
	"errors"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
	"github.com/outbox-relay/outbox-relay/verify"
)

// deleteModeConfig is the test relay configuration in delete mode.
func deleteModeConfig(db *testenv.DB, k *testenv.Kafka) relay.Config {
	cfg := testenv.RelayConfig(db, k)
	cfg.OnPublish = string(outbox.Delete)
	return cfg
}

// tableRows counts every row left in the outbox table, published or not.
func tableRows(t testing.TB, db *testenv.DB) int {
	t.Helper()
	var n int
	if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestDeleteModeEveryRowOnceAndTheTableEmpty: in delete mode, in each
// delivery mode without faults, a read_committed consumer sees every row
// exactly once, in id order per key, and the relay leaves the table empty
// (and, at-most-once, no in-flight record).
func TestDeleteModeEveryRowOnceAndTheTableEmpty(t *testing.T) {
	for _, mode := range []txn.Mode{txn.ExactlyOnce, txn.AtLeastOnce, txn.AtMostOnce} {
		t.Run(string(mode), func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			ids := db.Insert(t, topic, 250, faultsKeys)
			cfg := deleteModeConfig(db, k)
			cfg.Delivery = string(mode)
			reg := prometheus.NewRegistry()
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
			testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
			faultsEventually(t, 30*time.Second, "every row deleted", func() bool { return tableRows(t, db) == 0 })
			var inflight int
			if err := db.Pool.QueryRow(context.Background(), `SELECT count(*) FROM outbox_inflight`).Scan(&inflight); err != nil || inflight != 0 {
				t.Errorf("%d in-flight records left (%v), want 0", inflight, err)
			}
			faultsEventually(t, 10*time.Second, "every row counted published", func() bool {
				return faultsMetric(t, reg, "outbox_relay_published_records_total") == float64(len(ids))
			})
		})
	}
}

// TestDeleteModeCrashAfterCommitBeforeDeleteRepublishesNothing: in delete
// mode the relay dies after a Kafka transaction committed and before its
// rows were deleted: after the first batch's commit (FailAfterCommit), and,
// with the pipelined loop, after batch 2's commit while batch 1's delete was
// still to run (FailBeforeMarkPrevious: two committed batches in the table).
// Nothing is deleted before the crash point; the next relay's recovery
// deletes the committed rows from the checkpoint (id and created_at) and
// publishes none of them again; every row reaches Kafka once and the table
// ends empty.
func TestDeleteModeCrashAfterCommitBeforeDeleteRepublishesNothing(t *testing.T) {
	const batch = 10
	for _, c := range []struct {
		point     string
		committed int // batches committed at the crash
	}{{relay.FailAfterCommit, 1}, {relay.FailBeforeMarkPrevious, 2}} {
		t.Run(c.point, func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			ids := db.Insert(t, topic, 3*batch, faultsKeys)
			cfg := deleteModeConfig(db, k)
			cfg.BatchSize = batch
			var (
				mu        sync.Mutex
				crashed   bool
				committed [][]int64
			)
			crash := func(_ context.Context, name string, _ int32, b []int64) error {
				mu.Lock()
				defer mu.Unlock()
				if name == relay.FailAfterCommit {
					committed = append(committed, slices.Clone(b))
				}
				if name == c.point && !crashed {
					crashed = true
					return errSimulatedCrash
				}
				return nil
			}
			first := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
			if err := first.Wait(t, 30*time.Second); !errors.Is(err, errSimulatedCrash) {
				t.Fatalf("first relay: Run returned %v, want the simulated crash", err)
			}
			mu.Lock()
			if len(committed) != c.committed || !slices.Equal(slices.Concat(committed...), ids[:c.committed*batch]) {
				t.Fatalf("the first relay committed batches %v, want the first %d batches of %d rows", committed, c.committed, batch)
			}
			mu.Unlock()
			if n := tableRows(t, db); n != len(ids) {
				t.Fatalf("after the crash the table holds %d rows, want all %d: no committed row may be deleted before the crash point", n, len(ids))
			}
			cons := k.NewConsumer(t, topic)
			testenv.CheckExactlyOnce(t, ids[:c.committed*batch], cons.WaitFor(t, c.committed*batch, 30*time.Second))

			reg := prometheus.NewRegistry()
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
			testenv.CheckExactlyOnce(t, ids, cons.WaitFor(t, len(ids), 30*time.Second))
			faultsEventually(t, 30*time.Second, "every row deleted", func() bool { return tableRows(t, db) == 0 })
			if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != float64(c.committed*batch) {
				t.Errorf("outbox_relay_recovered_rows_total = %v, want %d: the committed batches deleted by recovery", got, c.committed*batch)
			}
			faultsEventually(t, 10*time.Second, "the rest counted published", func() bool {
				return faultsMetric(t, reg, "outbox_relay_published_records_total") == float64(len(ids)-c.committed*batch)
			})
		})
	}
}

// TestDeleteModeRowsReusingIdsAfterARestoreArePublishedNotDeleted: in delete
// mode rows 1-3 are published and deleted; the table then goes back in time
// (TRUNCATE ... RESTART IDENTITY) and three new rows take ids 1-3. The
// newest checkpoint still lists ids 1-3 with the old rows' created_at. The
// next relay's recovery must not delete the new rows (a silent loss): it
// publishes them, reports the rewind, and then deletes them.
func TestDeleteModeRowsReusingIdsAfterARestoreArePublishedNotDeleted(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := deleteModeConfig(db, k)
	first := db.Insert(t, topic, 3, []string{"a"})
	run := testenv.StartRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the first rows are published and deleted", func() bool { return tableRows(t, db) == 0 })
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}

	if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox RESTART IDENTITY`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value) SELECT $1, 'a'::bytea, ('new-' || g)::bytea FROM generate_series(1, 3) g`, topic); err != nil {
		t.Fatal(err)
	}
	if second := outboxIDs(t, db, ""); !slices.Equal(second, first) {
		t.Fatalf("the new rows have ids %v, want the reused %v", second, first)
	}

	// Held before the relay's first read: recovery's delete must have left
	// the three new rows.
	var (
		mu         sync.Mutex
		afterRecov = -1
	)
	seeRead := func(_ context.Context, name string, _ int32, _ []int64) error {
		mu.Lock()
		defer mu.Unlock()
		if name == relay.FailBeforeCommit && afterRecov < 0 {
			afterRecov = tableRows(t, db)
		}
		return nil
	}
	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg), relay.WithFailpoint(seeRead))
	seen := k.NewConsumer(t, topic).WaitFor(t, 6, 30*time.Second)
	var newValues []string
	for _, s := range seen {
		if len(s.Value) > 4 && string(s.Value[:4]) == "new-" {
			newValues = append(newValues, string(s.Value))
		}
	}
	if len(seen) != 6 || !slices.Equal(newValues, []string{"new-1", "new-2", "new-3"}) {
		t.Fatalf("Kafka holds %d records, new rows %v; want the 3 old and the 3 new rows (new-1..new-3) once each: the new rows reusing ids were deleted from the old checkpoint and lost", len(seen), newValues)
	}
	mu.Lock()
	if afterRecov != 3 {
		t.Errorf("after recovery, before the first transaction, the table held %d rows, want the 3 new rows", afterRecov)
	}
	mu.Unlock()
	faultsEventually(t, 15*time.Second, "the new rows are deleted once published", func() bool { return tableRows(t, db) == 0 })
	if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != 0 {
		t.Errorf("outbox_relay_recovered_rows_total = %v, want 0: recovery deleted a row that only reuses a recorded id", got)
	}
	if got := faultsMetric(t, reg, "outbox_relay_table_rewinds_total"); got != 1 {
		t.Errorf("outbox_relay_table_rewinds_total = %v, want 1", got)
	}
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "went back in time", `"ids_reused":3`) {
		t.Error("no ERROR line says the table went back in time with the 3 reused ids")
	}
}

// TestDeleteModeVerifyIsCleanAfterARunAndFindsWhatItCan: after a run in
// delete mode the table is empty; verify told OUTBOX_ON_PUBLISH=delete (and
// the topic) is clean and counts every record as a deleted row. Then a second record of a
// deleted row's outbox-id is a duplicate, a row left in the table for long
// although a committed record holds it is published_not_deleted, and a
// dead letter in Kafka is found.
func TestDeleteModeVerifyIsCleanAfterARunAndFindsWhatItCan(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 60, faultsKeys)
	run := testenv.StartRelay(t, db, deleteModeConfig(db, k))
	faultsEventually(t, 30*time.Second, "every row published and deleted", func() bool { return tableRows(t, db) == 0 })
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	vcfg := verify.Config{Pool: db.Pool, Table: db.Table, Brokers: k.Brokers, Since: time.Hour, OnPublish: outbox.Delete, Topics: []string{topic}}
	rep, err := verify.Run(ctx, vcfg)
	if err != nil || !rep.Clean() || rep.Deleted != len(ids) || rep.Records != len(ids) || rep.Rows != 0 || rep.OnPublish != "delete" {
		t.Fatalf("verify in delete mode after the run: %v; clean %v, deleted %d, records %d, rows %d, counts %v, findings %v; want clean with %d deleted",
			err, rep != nil && rep.Clean(), rep.Deleted, rep.Records, rep.Rows, rep.Counts, rep.Findings, len(ids))
	}
	var text strings.Builder
	if err := rep.WriteText(&text); err != nil || !strings.Contains(text.String(), "CLEAN") || !strings.Contains(text.String(), "cannot be compared") {
		t.Errorf("verify's text report in delete mode does not say what it cannot compare:\n%s", text.String())
	}

	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.DefaultProduceTopic(topic))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	header := func(id int64) []kgo.RecordHeader {
		return []kgo.RecordHeader{{Key: "outbox-id", Value: []byte(strconv.FormatInt(id, 10))}}
	}
	// A row committed in Kafka half an hour ago and never deleted.
	var left int64
	if err := db.Pool.QueryRow(ctx, `INSERT INTO outbox (topic, key, value, created_at) VALUES ($1, 'z', 'left', now() - interval '30 minutes') RETURNING id`, topic).Scan(&left); err != nil {
		t.Fatal(err)
	}
	// A dead letter that is in Kafka.
	dead := left + 100
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox_dead_letter (id, topic, key, value, created_at, error) VALUES ($1, $2, 'y', 'dead', now(), 'refused')`, dead, topic); err != nil {
		t.Fatal(err)
	}
	for _, r := range []*kgo.Record{
		{Key: []byte(faultsKeys[ids[4]%int64(len(faultsKeys))]), Value: []byte("again"), Headers: header(ids[4])},
		{Key: []byte("z"), Value: []byte("left"), Headers: header(left)},
		{Key: []byte("y"), Value: []byte("dead"), Headers: header(dead)},
	} {
		if err := cl.ProduceSync(ctx, r).FirstErr(); err != nil {
			t.Fatal(err)
		}
	}
	rep, err = verify.Run(ctx, vcfg)
	if err != nil {
		t.Fatal(err)
	}
	want := map[string]int64{verify.Duplicate: ids[4], verify.NotDeleted: left, verify.DeadInKafka: dead}
	for kind, id := range want {
		found := false
		for _, f := range rep.Findings {
			found = found || f.Kind == kind && f.ID == id
		}
		if rep.Counts[kind] != 1 || !found {
			t.Errorf("%s: counted %d, want 1 finding naming id %d (findings %v)", kind, rep.Counts[kind], id, rep.Findings)
		}
	}
	if rep.Clean() || rep.Deleted != len(ids) || rep.Counts[verify.Phantom] != 0 || rep.Counts[verify.Missing] != 0 {
		t.Errorf("verify with the faults: clean %v, deleted %d (want %d), counts %v", rep.Clean(), rep.Deleted, len(ids), rep.Counts)
	}
}
