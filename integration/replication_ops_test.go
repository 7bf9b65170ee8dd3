package integration

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// gauge is the value of the gauge name with label slot=slot in reg, and
// whether the series exists.
func gauge(t *testing.T, reg *prometheus.Registry, name, slot string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "slot" && l.GetValue() == slot {
					return m.GetGauge().GetValue(), true
				}
			}
		}
	}
	return 0, false
}

// TestReplicationLagMetricFollowsTheSlot: outbox_relay_replication_lag_bytes
// reports the WAL between the server's position and the slot's confirmed
// position: it grows while another table is written faster than the relay
// confirms, comes back near zero once the writes stop (idle checkpoints),
// and is gone once the relay no longer reads the slot.
func TestReplicationLagMetricFollowsTheSlot(t *testing.T) {
	db := logicalDB(t)
	ctx := context.Background()
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
	reg := prometheus.NewRegistry()
	c := k.NewConsumer(t, topic)
	want := db.Insert(t, topic, 5, []string{"a"})
	r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	c.WaitFor(t, len(want), 60*time.Second)
	const slot, name = "postgres_public_outbox_relay", "outbox_relay_replication_lag_bytes"
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE other (v text)`); err != nil {
		t.Fatal(err)
	}
	const mb = 1 << 20
	peak := 0.0
	for deadline := time.Now().Add(40 * time.Second); peak < mb; {
		if time.Now().After(deadline) {
			t.Fatalf("%s{slot=%q} never passed 1 MB while another table took 1 MB every 300ms (peak %.0f)", name, slot, peak)
		}
		if _, err := db.Pool.Exec(ctx, `INSERT INTO other SELECT repeat('x', 1000) FROM generate_series(1, 1000)`); err != nil {
			t.Fatal(err)
		}
		time.Sleep(300 * time.Millisecond)
		if v, ok := gauge(t, reg, name, slot); ok && v > peak {
			peak = v
		}
	}
	t.Logf("peak lag while another table was written: %.0f bytes", peak)
	var last float64
	for deadline := time.Now().Add(60 * time.Second); ; {
		v, ok := gauge(t, reg, name, slot)
		if ok && v < 64<<10 {
			t.Logf("lag once the writes stopped: %.0f bytes", v)
			break
		}
		last = v
		if time.Now().After(deadline) {
			t.Fatalf("%s stayed at %.0f bytes after the writes stopped: the idle outbox pins WAL", name, last)
		}
		time.Sleep(500 * time.Millisecond)
	}
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	if v, ok := gauge(t, reg, name, slot); ok {
		t.Fatalf("%s{slot=%q} = %.0f after the relay stopped reading the slot: another owner reports it", name, slot, v)
	}
}

// TestReplicationStopsLoudlyOnAnotherHistory: a slot dropped, or dropped
// and created again, after the checkpoint was written stops the relay
// with an error that names the cause and the way out; it never starts
// from another position.
func TestReplicationStopsLoudlyOnAnotherHistory(t *testing.T) {
	for _, tc := range []struct {
		name, want string
		change     string
	}{
		{"dropped", "does not exist, but the checkpoint is at", `SELECT pg_drop_replication_slot('postgres_public_outbox_relay')`},
		{"recreated", "past the checkpoint's", `SELECT pg_drop_replication_slot('postgres_public_outbox_relay');
CREATE TABLE wal_filler AS SELECT repeat('x', 100) FROM generate_series(1, 1000);
SELECT pg_create_logical_replication_slot('postgres_public_outbox_relay', 'pgoutput')`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			db := logicalDB(t)
			ctx := context.Background()
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 1, topic)
			cfg := testenv.RelayConfig(db, k)
			cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
			c := k.NewConsumer(t, topic)
			want := db.Insert(t, topic, 5, []string{"a"})
			r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			time.Sleep(time.Second)
			want = append(want, db.Insert(t, topic, 5, []string{"a"})...)
			c.WaitFor(t, len(want), 60*time.Second)
			if err := r.Stop(); err != nil {
				t.Fatal(err)
			}
			for _, q := range strings.Split(tc.change, ";\n") {
				if _, err := db.Pool.Exec(ctx, q); err != nil {
					t.Fatal(err)
				}
			}
			db.Insert(t, topic, 3, []string{"a"})
			again := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			err := again.Wait(t, 60*time.Second)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), `docs/replication.md, "Replication recovery"`) {
				t.Fatalf("the relay did not stop naming the cause (%q) and the way out: %v", tc.want, err)
			}
			t.Logf("stopped with: %v", err)
		})
	}
}

// TestReplicationStopsLoudlyWhenTheSlotLostItsWAL: WAL the slot needs
// removed (past max_slot_wal_keep_size while the relay was down) stops the
// relay with an error naming it; it never starts from a later position.
func TestReplicationStopsLoudlyWhenTheSlotLostItsWAL(t *testing.T) {
	pg := testenv.StartPrivatePostgres(t, "wal_level=logical", "max_replication_slots=8", "max_wal_senders=8", "max_slot_wal_keep_size=1MB", "min_wal_size=32MB", "max_wal_size=32MB")
	db := migratedDB(t, pg.URL("postgres", "postgres"))
	ctx := context.Background()
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	cfg.Source, cfg.DeadLetterOrder = "replication", "skip"
	c := k.NewConsumer(t, topic)
	want := db.Insert(t, topic, 5, []string{"a"})
	r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	c.WaitFor(t, len(want), 60*time.Second)
	if err := r.Stop(); err != nil {
		t.Fatal(err)
	}
	db.Insert(t, topic, 3, []string{"a"}) // after the checkpoint: lost with the WAL
	if _, err := db.Pool.Exec(ctx, `CREATE TABLE filler (v text)`); err != nil {
		t.Fatal(err)
	}
	for i := 0; ; i++ {
		var status *string
		if err := db.Pool.QueryRow(ctx, `SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'postgres_public_outbox_relay'`).Scan(&status); err != nil {
			t.Fatal(err)
		}
		if status != nil && *status == "lost" {
			break
		}
		if i == 40 {
			t.Fatalf("the slot's WAL was never removed (wal_status %v)", status)
		}
		for _, q := range []string{`INSERT INTO filler SELECT repeat('x', 1000) FROM generate_series(1, 8000)`, `SELECT pg_switch_wal()`, `CHECKPOINT`} {
			if _, err := db.Pool.Exec(ctx, q); err != nil {
				t.Fatal(err)
			}
		}
	}
	again := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	err := again.Wait(t, 60*time.Second)
	if err == nil || !strings.Contains(err.Error(), "wal_status lost") || !strings.Contains(err.Error(), `docs/replication.md, "Replication recovery"`) {
		t.Fatalf("the relay did not stop naming the lost WAL and the way out: %v", err)
	}
	t.Logf("stopped with: %v", err)
}
