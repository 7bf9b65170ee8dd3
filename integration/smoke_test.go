package integration

import (
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

func TestSmokeRowsReachKafkaOnce(t *testing.T) {
	db := testenv.NewDB(t)
	k := testenv.NewKafka(t, 3, "payments")
	ids := db.Insert(t, "payments", 250, []string{"a", "b", "c", "d"})
	cfg := testenv.RelayConfig(db, k)
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	c := k.NewConsumer(t, "payments")
	seen := c.WaitFor(t, len(ids), 30*time.Second)
	testenv.CheckExactlyOnce(t, ids, seen)
	more := db.Insert(t, "payments", 10, []string{"a"})
	seen = c.WaitFor(t, len(ids)+len(more), 30*time.Second)
	testenv.CheckExactlyOnce(t, append(ids, more...), seen)
}
