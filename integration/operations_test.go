package integration

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// TestNewerCheckpointFormatStopsTheRelay: a checkpoint in a format this relay
// does not know (written by a newer version) is never applied blindly: the
// relay stops with an error that says to upgrade, and marks nothing.
func TestNewerCheckpointFormatStopsTheRelay(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	cfg := testenv.RelayConfig(db, k)
	tcfg := txn.Config{Brokers: k.Brokers, CheckpointTopic: cfg.CheckpointTopic, RelayName: cfg.RelayName, Logger: slog.New(slog.DiscardHandler)}
	if err := txn.EnsureCheckpointTopic(ctx, tcfg, 1); err != nil {
		t.Fatal(err)
	}
	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.TransactionalID(tcfg.TransactionalID(0)), kgo.DefaultProduceTopic(cfg.CheckpointTopic),
		kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	if err := cl.BeginTransaction(); err != nil {
		t.Fatal(err)
	}
	if err := cl.ProduceSync(ctx, &kgo.Record{Partition: 0, Value: []byte(`{"v":3,"relay":"x","ids":[1]}`)}).FirstErr(); err != nil {
		t.Fatal(err)
	}
	if err := cl.EndTransaction(ctx, kgo.TryCommit); err != nil {
		t.Fatal(err)
	}
	db.Insert(t, "payments", 1, nil)

	run := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	err = run.Wait(t, 30*time.Second)
	if !errors.Is(err, txn.ErrCheckpointFormat) || !strings.Contains(err.Error(), "upgrade the relay") {
		t.Fatalf("Run returned %v, want the checkpoint format error", err)
	}
	if n := db.Unpublished(t); n != 1 {
		t.Fatalf("%d unpublished rows, want 1: a checkpoint in an unknown format must not mark anything", n)
	}
}

// TestRetentionDeletesOnlyOldPublishedRows: published rows older than
// OUTBOX_RETENTION are deleted; recent and unpublished ones stay.
func TestRetentionDeletesOnlyOldPublishedRows(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	ids := db.Insert(t, "payments", 10, nil)
	// Rows 1-5 published long ago, 6-8 recently, 9-10 not yet (the relay
	// publishes them, now).
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET published_at = now() - interval '2 hours' WHERE id <= $1`, ids[4]); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Pool.Exec(ctx, `UPDATE outbox SET published_at = now() WHERE id > $1 AND id <= $2`, ids[4], ids[7]); err != nil {
		t.Fatal(err)
	}
	cfg := testenv.RelayConfig(db, k)
	cfg.Retention = time.Hour
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
	k.NewConsumer(t, "payments").WaitFor(t, 2, 30*time.Second)
	deadline := time.Now().Add(10 * time.Second)
	var left []int64
	for time.Now().Before(deadline) {
		rows, err := db.Pool.Query(ctx, `SELECT id FROM outbox ORDER BY id`)
		if err != nil {
			t.Fatal(err)
		}
		left = left[:0]
		for rows.Next() {
			var id int64
			_ = rows.Scan(&id)
			left = append(left, id)
		}
		rows.Close()
		if len(left) == 5 {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	if len(left) != 5 || left[0] != ids[5] {
		t.Fatalf("rows left after retention: %v, want ids %v", left, ids[5:])
	}
	if got := counter(t, reg, "outbox_relay_retention_deleted_rows_total", nil); got != 5 {
		t.Fatalf("retention_deleted_rows_total = %v, want 5", got)
	}
}

// TestHealthAndReadiness: /healthz answers at once, /readyz only once the
// relay has started, and /metrics serves the relay's metrics.
func TestHealthAndReadiness(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	reg := prometheus.NewRegistry()
	r, err := relay.New(testenv.RelayConfig(db, k), db.Pool, relay.WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(r.Handler(reg))
	defer srv.Close()
	get := func(path string) (int, string) {
		resp, err := http.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, _ := get("/healthz"); code != 200 {
		t.Fatalf("/healthz = %d", code)
	}
	if code, _ := get("/readyz"); code != 503 {
		t.Fatalf("/readyz before start = %d, want 503", code)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	deadline := time.Now().Add(20 * time.Second)
	for !r.Ready() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	if code, _ := get("/readyz"); code != 200 {
		t.Fatalf("/readyz after start = %d, want 200", code)
	}
	if _, body := get("/metrics"); !strings.Contains(body, "outbox_relay_owned_shards") {
		t.Fatalf("/metrics lacks outbox_relay_owned_shards:\n%.500s", body)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("clean shutdown returned %v", err)
	}
	if code, _ := get("/readyz"); code != 503 {
		t.Fatalf("/readyz after shutdown = %d, want 503", code)
	}
}

// counter returns the value of a counter (summed over label sets matching
// labels) from reg.
func counter(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	sum := 0.0
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for k, v := range labels {
				found := false
				for _, lp := range m.GetLabel() {
					if lp.GetName() == k && lp.GetValue() == v {
						found = true
					}
				}
				if !found {
					continue metrics
				}
			}
			if c := m.GetCounter(); c != nil {
				sum += c.GetValue()
			}
			if g := m.GetGauge(); g != nil {
				sum += g.GetValue()
			}
		}
	}
	return sum
}

// TestIdleRelayWakesOnCommit: with a 30 s poll interval, an idle relay
// still publishes a new row within milliseconds of its commit, because the
// insert trigger notifies it. Without the wake-up this test waits 30 s.
func TestIdleRelayWakesOnCommit(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 1, "payments")
	cfg := testenv.RelayConfig(db, k)
	cfg.PollInterval = 30 * time.Second
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	db.Insert(t, "payments", 1, nil)
	waitPublished := func() time.Duration {
		start := time.Now()
		for time.Since(start) < 10*time.Second {
			if db.Unpublished(t) == 0 {
				return time.Since(start)
			}
			time.Sleep(time.Millisecond)
		}
		t.Fatalf("row not published within 10 s: the idle relay was not woken")
		return 0
	}
	waitPublished()
	var worst time.Duration
	for i := range 3 {
		// Let the relay go idle: past its grace polls, it waits on the
		// notification (or 30 s).
		time.Sleep(3 * time.Second)
		if _, err := db.Pool.Exec(ctx, `INSERT INTO outbox (topic, value) VALUES ('payments', 'x')`); err != nil {
			t.Fatal(err)
		}
		d := waitPublished()
		t.Logf("wake-up %d: published %v after commit", i, d)
		worst = max(worst, d)
	}
	// Polling alone (trigger dropped) takes 1-2 s here: the idle relay's
	// poll interval has grown to 2 s by then.
	if worst > 400*time.Millisecond {
		t.Fatalf("slowest wake-up took %v: the notification did not wake the idle relay", worst)
	}
}
