package integration

import (
	"context"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestForeignRecordInCheckpointPartitionStopsTheShardVisibly: an operator
// "resets" the shard's checkpoint key with a tombstone. Recovery cannot know
// what the shard committed, so it must not guess and must not retry forever:
// the shard stops with an error naming the topic, partition and offset and
// the way out, /readyz answers 503 with it, nothing is marked, and the
// process keeps running (other shards would flow on).
func TestForeignRecordInCheckpointPartitionStopsTheShardVisibly(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	cfg := testenv.RelayConfig(db, k)
	db.Insert(t, topic, 3, nil)
	first := testenv.StartRelay(t, db, cfg)
	faultsEventually(t, 30*time.Second, "the first rows are published", func() bool { return db.Unpublished(t) == 0 })
	if err := first.Stop(); err != nil {
		t.Fatal(err)
	}

	cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.RecordPartitioner(kgo.ManualPartitioner()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	res := cl.ProduceSync(ctx, &kgo.Record{Topic: cfg.CheckpointTopic, Partition: 0, Key: []byte(cfg.RelayName + "-0"), Value: nil})
	if err := res.FirstErr(); err != nil {
		t.Fatal(err)
	}
	tombstone := res[0].Record.Offset
	db.Insert(t, topic, 2, nil)

	reg := prometheus.NewRegistry()
	logs := &testenv.SyncBuffer{}
	r, err := relay.New(cfg, db.Pool, relay.WithLogger(testenv.Logger(t, logs)), relay.WithRegisterer(reg))
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(r.Handler(reg))
	defer srv.Close()
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(rctx) }()
	defer func() {
		cancel()
		<-done
	}()
	readyz := func() (int, string) {
		resp, err := http.Get(srv.URL + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	want := []string{cfg.CheckpointTopic, "partition 0", "offset " + itoa(tombstone), "tombstone", "OUTBOX_CHECKPOINT_TOPIC"}
	faultsEventually(t, 20*time.Second, "/readyz reports the stopped shard", func() bool {
		code, body := readyz()
		return code == http.StatusServiceUnavailable && containsAll(body, want)
	})
	recoveries := faultsMetric(t, reg, "outbox_relay_recoveries_total")
	time.Sleep(3 * time.Second)
	if again := faultsMetric(t, reg, "outbox_relay_recoveries_total"); again != recoveries || again > 1 {
		t.Errorf("recoveries_total went from %v to %v in 3 s: recovery loops instead of stopping the shard", recoveries, again)
	}
	select {
	case err := <-done:
		t.Fatalf("Run returned %v: the process stops, want only the shard stopped (and /readyz saying why)", err)
	default:
	}
	if !faultsLogHas(logs.String(), `"level":"ERROR"`, "not a checkpoint", "OUTBOX_CHECKPOINT_TOPIC") {
		t.Error("no ERROR line says the checkpoint partition holds a record that is not a checkpoint")
	}
	if n := db.Unpublished(t); n != 2 {
		t.Errorf("%d rows unpublished, want the 2 new ones: a shard without a readable checkpoint must not publish", n)
	}
}

func containsAll(s string, parts []string) bool {
	for _, p := range parts {
		if !strings.Contains(s, p) {
			return false
		}
	}
	return true
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
