package integration

import (
	"context"
	"slices"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestRowsReusingIdsAfterARestoreArePublishedNotMarked: rows 1-3 are
// published; the table then goes back in time (here TRUNCATE ... RESTART
// IDENTITY, as a point-in-time restore or a fail-over that lost the
// sequence's WAL would) and three new rows take ids 1-3. The newest
// checkpoint still lists ids 1-3. The next relay must not mark the new rows
// from it (they were never published: a silent loss), must publish them, and
// must say that the table went back in time.
func TestRowsReusingIdsAfterARestoreArePublishedNotMarked(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	first := db.Insert(t, topic, 3, []string{"a"})
	run := testenv.StartRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the first rows are published", func() bool { return db.Unpublished(t) == 0 })
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}

	if _, err := db.Pool.Exec(ctx, `TRUNCATE outbox RESTART IDENTITY`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, key, value) SELECT $1, 'a'::bytea, ('new-' || g)::bytea FROM generate_series(1, 3) g`, topic); err != nil {
		t.Fatal(err)
	}
	second := outboxIDs(t, db, "")
	if !slices.Equal(second, first) {
		t.Fatalf("the new rows have ids %v, want the reused %v", second, first)
	}

	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	seen := k.NewConsumer(t, topic).WaitFor(t, 6, 30*time.Second)
	var newValues []string
	for _, s := range seen {
		if len(s.Value) > 4 && string(s.Value[:4]) == "new-" {
			newValues = append(newValues, string(s.Value))
		}
	}
	if len(seen) != 6 || !slices.Equal(newValues, []string{"new-1", "new-2", "new-3"}) {
		t.Fatalf("Kafka holds %d records, new rows %v; want the 3 old and the 3 new rows (new-1..new-3) once each: the new rows reusing ids were marked published from the old checkpoint and lost", len(seen), newValues)
	}
	faultsEventually(t, 15*time.Second, "the new rows are marked", func() bool { return db.Unpublished(t) == 0 })
	if got := faultsMetric(t, reg, "outbox_relay_table_rewinds_total"); got != 1 {
		t.Errorf("outbox_relay_table_rewinds_total = %v, want 1", got)
	}
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "went back in time", `"ids_reused":3`) {
		t.Error("no ERROR line says the table went back in time with the 3 reused ids")
	}
}

// TestTableRestoredBeforeItsPublishedRowsIsReported: the table is restored
// to a point before rows the newest checkpoint lists (their ids are beyond
// the sequence now). The relay says so at recovery, and rows written after
// the restore are published.
func TestTableRestoredBeforeItsPublishedRowsIsReported(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	db.Insert(t, topic, 5, nil)
	run := testenv.StartRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the rows are published", func() bool { return db.Unpublished(t) == 0 })
	if err := run.Stop(); err != nil {
		t.Fatal(err)
	}
	// The restore: rows 3-5 and the sequence's last two steps are gone.
	if _, err := db.Pool.Exec(ctx, `DELETE FROM outbox WHERE id > 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `SELECT setval(pg_get_serial_sequence('outbox', 'id'), 2)`); err != nil {
		t.Fatal(err)
	}

	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	faultsEventually(t, 30*time.Second, "recovery reports the rewind", func() bool {
		return faultsMetric(t, reg, "outbox_relay_table_rewinds_total") == 1
	})
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "went back in time", `"ahead_of_sequence":true`, `"checkpoint_max_id":5`, `"sequence_last_value":2`) {
		t.Error("no ERROR line names the checkpoint's id 5 ahead of the sequence's 2")
	}
	after := db.Insert(t, topic, 3, nil)
	seen := k.NewConsumer(t, topic).WaitFor(t, 8, 30*time.Second)
	got := map[int64]int{}
	for _, s := range seen {
		got[s.ID]++
	}
	for _, id := range after {
		if got[id] != 2 { // once before the restore, once after: the same id, another row
			t.Errorf("id %d is in Kafka %d times, want 2 (the old row and the new one reusing its id)", id, got[id])
		}
	}
}

// TestLostMarksWithinTheRecoveryWindowRepublishNothing: a fail-over to an
// asynchronous standby (or a restore) loses the marks of the last five
// batches, all committed in Kafka. Recovery re-applies the marks of every
// batch in the checkpoint's window (OUTBOX_RECOVERY_WINDOW, here 8), so
// nothing is published twice. With a window of 2, exactly the three batches
// beyond it are published again: the documented limit.
func TestLostMarksWithinTheRecoveryWindowRepublishNothing(t *testing.T) {
	for _, c := range []struct {
		window, republished int
	}{{8, 0}, {2, 15}} {
		t.Run("window="+strconv.Itoa(c.window), func(t *testing.T) {
			ctx := context.Background()
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 1, topic)
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = 5
			cfg.RecoveryWindow = c.window
			ids := db.Insert(t, topic, 25, nil) // five batches of five
			run := testenv.StartRelay(t, db, cfg)
			faultsEventually(t, 30*time.Second, "every row is published", func() bool { return db.Unpublished(t) == 0 })
			if err := run.Stop(); err != nil {
				t.Fatal(err)
			}
			batches := 0
			if err := db.Pool.QueryRow(ctx, `SELECT count(DISTINCT published_at) FROM outbox`).Scan(&batches); err != nil || batches != 5 {
				t.Fatalf("rows were marked in %d batches (%v), want 5", batches, err)
			}
			// The fail-over: the standby never received the marks.
			if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET published_at = NULL`); err != nil {
				t.Fatal(err)
			}

			reg := prometheus.NewRegistry()
			testenv.StartRelay(t, db, cfg, relay.WithRegisterer(reg))
			faultsEventually(t, 30*time.Second, "every row is marked again", func() bool { return db.Unpublished(t) == 0 })
			seen := k.NewConsumer(t, topic).WaitFor(t, len(ids)+c.republished, 30*time.Second)
			count := map[int64]int{}
			for _, s := range seen {
				count[s.ID]++
			}
			var twice []int64
			for _, id := range ids {
				if count[id] == 0 {
					t.Fatalf("id %d never reached Kafka", id)
				}
				if count[id] > 1 {
					twice = append(twice, id)
				}
			}
			if len(twice) != c.republished || len(seen) != len(ids)+c.republished {
				t.Fatalf("window %d: %d records for %d rows, %d ids published twice (%v); want %d published twice",
					c.window, len(seen), len(ids), len(twice), twice, c.republished)
			}
			if c.republished > 0 && !slices.Equal(twice, ids[:c.republished]) {
				t.Fatalf("republished %v, want the oldest batches beyond the window %v", twice, ids[:c.republished])
			}
			if got := faultsMetric(t, reg, "outbox_relay_recovered_rows_total"); got != float64(len(ids)-c.republished) {
				t.Errorf("outbox_relay_recovered_rows_total = %v, want %d", got, len(ids)-c.republished)
			}
		})
	}
}
