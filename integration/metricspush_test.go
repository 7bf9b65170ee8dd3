package integration

import (
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestMetricsPushFollowsEnableMetricsPush: kfake, like a broker with a
// client-telemetry plugin, offers every client a KIP-714 subscription. With
// the default (enable.metrics.push=true) the relay's Kafka clients ask for
// it; with OUTBOX_KAFKA_ENABLE_METRICS_PUSH=false none of them does (no
// GetTelemetrySubscriptions request at all), and the rows are published all
// the same.
func TestMetricsPushFollowsEnableMetricsPush(t *testing.T) {
	modesNeedControl(t, "a count of GetTelemetrySubscriptions requests")
	for _, push := range []bool{true, false} {
		t.Run(map[bool]string{true: "default", false: "off"}[push], func(t *testing.T) {
			db := testenv.NewDB(t)
			topic := testenv.RandomName("payments-")
			k := testenv.NewKafka(t, 3, topic)
			var asked atomic.Int32
			k.Cluster.ControlKey(kmsg.GetTelemetrySubscriptions.Int16(), func(kmsg.Request) (kmsg.Response, error, bool) {
				k.Cluster.KeepControl()
				asked.Add(1)
				return nil, nil, false // kfake answers it
			})
			ids := db.Insert(t, topic, 20, faultsKeys)
			cfg := testenv.RelayConfig(db, k)
			if !push {
				off := false
				cfg.MetricsPush = &off
			}
			testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			faultsEventually(t, 30*time.Second, "every row marked", func() bool { return db.Unpublished(t) == 0 })
			// Counted before the test's own consumer (a client that
			// asks) connects.
			n := asked.Load()
			testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 30*time.Second))
			switch {
			case push && n == 0:
				t.Errorf("no client of the relay asked for a telemetry subscription: enable.metrics.push is true by default")
			case !push && n > 0:
				t.Errorf("%d GetTelemetrySubscriptions requests with OUTBOX_KAFKA_ENABLE_METRICS_PUSH=false, want none", n)
			}
		})
	}
}
