package integration

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestFailoverToAnotherRecoveryWindowRepublishesNothing: a relay dies with
// committed batches not durably marked, and a standby started with another
// OUTBOX_RECOVERY_WINDOW takes the shard over. Recovery marks every row the
// checkpoint's window lists, whatever the new instance's own window (I9: the
// window is read from what was recorded): a read_committed consumer sees
// every row exactly once.
//
//   - window 8 (pipelined) to window 1 (serial): the old relay dies after
//     batch n+1 committed, with batch n's mark in flight; the checkpoint
//     lists both. Trimmed to the new instance's one batch, recovery would
//     mark n+1 only and publish n again.
//   - window 1 (serial) to window 8: the old relay dies after a commit,
//     before its mark; the checkpoint lists that one batch.
//   - window 8 to 1 and back to 8 (the setting switched across two restarts,
//     each a crash with marks pending).
func TestFailoverToAnotherRecoveryWindowRepublishesNothing(t *testing.T) {
	for _, windows := range [][]int{{8, 1}, {1, 8}, {8, 1, 8}} {
		t.Run(fmt.Sprint(windows), func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			const batch = 10
			ids := db.Insert(t, topic, 3*batch*len(windows), faultsKeys)
			c := k.NewConsumer(t, topic)
			base := testenv.RelayConfig(db, k)
			base.BatchSize = batch
			for i, w := range windows[:len(windows)-1] {
				cfg := base
				cfg.RecoveryWindow = w
				// Pipelined (window >= 2): die where batch n+1 committed and
				// batch n's mark has not run. Serial: die after a commit.
				point := relay.FailBeforeMarkPrevious
				if w == 1 {
					point = relay.FailAfterCommit
				}
				var (
					mu      sync.Mutex
					crashed bool
					commits int
				)
				crash := func(_ context.Context, name string, _ int32, _ []int64) error {
					mu.Lock()
					defer mu.Unlock()
					if name == relay.FailAfterCommit {
						commits++
					}
					// The second time: every earlier incarnation's batches
					// are behind, and this one has two batches committed.
					if name == point && !crashed && commits >= 2 {
						crashed = true
						return errSimulatedCrash
					}
					return nil
				}
				r := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithFailpoint(crash))
				if err := r.Wait(t, 60*time.Second); !errors.Is(err, errSimulatedCrash) {
					t.Fatalf("relay %d (window %d): Run returned %v, want the simulated crash at %s", i+1, w, err, point)
				}
				t.Logf("relay %d (window %d) crashed at %s with %d rows unmarked", i+1, w, point, db.Unpublished(t))
			}
			reg := prometheus.NewRegistry()
			cfg := base
			cfg.RecoveryWindow = windows[len(windows)-1]
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)), relay.WithRegisterer(reg))
			faultsEventually(t, 60*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
			seen := c.WaitFor(t, len(ids), 60*time.Second)
			dups := len(seen) - len(ids)
			t.Logf("windows %v: %d records for %d rows (%d duplicates), recovered %v rows", windows, len(seen), len(ids), dups,
				faultsMetric(t, reg, "outbox_relay_recovered_rows_total"))
			testenv.CheckExactlyOnce(t, ids, seen)
		})
	}
}
