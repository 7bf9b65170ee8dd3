package integration

// Bounds that keep one shard alive and visible: reads bounded in bytes, so a
// few huge rows cannot run the relay out of memory, and a gauge of the
// consecutive failures of a shard whose batches fail for a reason that is
// not a row's (NOT_ENOUGH_REPLICAS, an offline partition, a broker down).

import (
	"context"
	"crypto/rand"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestLargeRowsAreReadInBatchesBoundedInBytes: with
// OUTBOX_BATCH_MAX_BYTES=500000, rows of 200 kB are read two at a time (a
// third would pass the bound) and a 600 kB row, larger than the bound by
// itself, is read alone: a read never holds more than the bound unless it
// is one row. Every row reaches a read_committed consumer exactly once, in
// order per key.
func TestLargeRowsAreReadInBatchesBoundedInBytes(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("documents-")
	k := testenv.NewKafka(t, 3, topic)
	const limit = 500000
	sizes := []int{200000, 200000, 200000, 200000, 600000, 200000, 200000, 200000, 200000}
	var msgs []outbox.Message
	for i, n := range sizes {
		v := make([]byte, n)
		_, _ = rand.Read(v)
		msgs = append(msgs, outbox.Message{Topic: topic, Key: []byte{byte('a' + i%2)}, Value: v})
	}
	if err := db.Table.Write(ctx, db.Pool, msgs...); err != nil {
		t.Fatal(err)
	}
	ids := make([]int64, len(sizes))
	for i := range ids {
		ids[i] = int64(i + 1)
	}

	var (
		mu      sync.Mutex
		batches [][]int64
	)
	record := func(_ context.Context, name string, _ int32, batch []int64) error {
		if name == relay.FailAfterMark {
			mu.Lock()
			batches = append(batches, slices.Clone(batch))
			mu.Unlock()
		}
		return nil
	}
	cfg := testenv.RelayConfig(db, k)
	cfg.ReadMaxBytes = limit
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(record))
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 60*time.Second))
	faultsEventually(t, 10*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })

	mu.Lock()
	defer mu.Unlock()
	want := [][]int64{{1, 2}, {3, 4}, {5}, {6, 7}, {8, 9}}
	if !slices.EqualFunc(batches, want, slices.Equal[[]int64]) {
		t.Errorf("batches %v, want %v (at most %d bytes of key and value each, or one row)", batches, want, limit)
	}
	for _, b := range batches {
		sum := 0
		for _, id := range b {
			sum += sizes[id-1] + 1 // the value and its 1-byte key
		}
		if sum > limit && len(b) > 1 {
			t.Errorf("batch %v holds %d bytes, more than OUTBOX_BATCH_MAX_BYTES=%d", b, sum, limit)
		}
	}
}

// TestPersistentBatchFailureIsCountedPerShardUntilRecovered: every produce
// to the rows' topic is answered NOT_ENOUGH_REPLICAS, a failure no row is to
// blame for. Nothing is dead-lettered or published; the shard's
// outbox_relay_shard_consecutive_failures gauge climbs with each failed
// batch or recovery, so the alert can fire. Once the fault stops, the rows
// are published exactly once and the gauge returns to 0.
func TestPersistentBatchFailureIsCountedPerShardUntilRecovered(t *testing.T) {
	modesNeedControl(t, "NOT_ENOUGH_REPLICAS on Produce")
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 3, topic)
	ids := db.Insert(t, topic, 30, faultsKeys)
	fault := modesInject(t, k, kmsg.Produce, -1, modesProduceFailing(t, k, topic, kerr.NotEnoughReplicas))
	cfg := testenv.RelayConfig(db, k)
	// The producer retries NOT_ENOUGH_REPLICAS until the batch's budget
	// (9/10 of the transaction timeout) runs out: short, to fail fast.
	cfg.TransactionTimeout = 2 * time.Second
	reg := prometheus.NewRegistry()
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))

	// The gauge of shard 0, and whether the relay reports it (only for a
	// shard it owns: 0 must mean healthy, not released).
	gauge := func() (float64, bool) {
		t.Helper()
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() != "outbox_relay_shard_consecutive_failures" {
				continue
			}
			for _, m := range mf.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "shard" && l.GetValue() == "0" {
						return m.GetGauge().GetValue(), true
					}
				}
			}
		}
		return 0, false
	}
	faultsEventually(t, 60*time.Second, "the shard's consecutive failures climb to 3", func() bool { v, _ := gauge(); return v >= 3 })
	if fault.Fired() == 0 {
		t.Fatal("the fault never fired")
	}
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("%d rows marked while every produce failed", len(ids)-n)
	}
	if got := faultsMetric(t, reg, "outbox_relay_dead_letters_total"); got != 0 {
		t.Fatalf("%v rows dead-lettered for NOT_ENOUGH_REPLICAS, which is no row's fault", got)
	}
	climbed, _ := gauge()

	fault.Stop()
	faultsEventually(t, 60*time.Second, "every row marked after the fault stopped", func() bool { return db.Unpublished(t) == 0 })
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
	if got, ok := gauge(); !ok || got != 0 {
		t.Errorf("consecutive failures = %v (reported: %v) after the shard published again, want 0 reported by its owner", got, ok)
	}
	t.Logf("consecutive failures climbed to %v, then returned to 0; NOT_ENOUGH_REPLICAS answered %s times", climbed, strconv.Itoa(fault.Fired()))
}
