package integration

import (
	"context"
	"encoding/json"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
)

// TestDeadLetterLogNamesEachRowsOwnCause: one batch holds a row of a
// missing topic and a row too large for Kafka. Both are dead-lettered in one
// move; the WARN line that reports the move must give each id its own
// cause, not label both with the first row's error.
func TestDeadLetterLogNamesEachRowsOwnCause(t *testing.T) {
	ctx := context.Background()
	db := testenv.NewDB(t)
	topic, missing := testenv.RandomName("payments-"), testenv.RandomName("missing-")
	k := topicsKafka(t, false, topic)
	good := db.Insert(t, topic, 3, faultsKeys)
	odd := db.Insert(t, missing, 1, []string{"acct-odd"})[0]
	var big int64
	if err := db.Pool.QueryRow(ctx, `INSERT INTO `+db.Table.Ident()+` (topic, key, value) VALUES ($1, 'acct-big', convert_to(repeat('x', 2 << 20), 'UTF8')) RETURNING id`,
		topic).Scan(&big); err != nil {
		t.Fatal(err)
	}
	good = append(good, db.Insert(t, topic, 3, faultsKeys)...)
	logs := &testenv.SyncBuffer{}
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithLogger(testenv.Logger(t, logs)))
	faultsEventually(t, 60*time.Second, "every row published or dead-lettered", func() bool { return db.Unpublished(t) == 0 })
	testenv.CheckExactlyOnce(t, good, k.NewConsumer(t, topic).WaitFor(t, len(good), 30*time.Second))

	// What the log says each dead-lettered id failed with, in either shape
	// the line has had: one error for all ids, or each cause with its ids.
	said := map[int64][]string{}
	for _, line := range strings.Split(logs.String(), "\n") {
		if !strings.Contains(line, "rows moved to the dead-letter table") {
			continue
		}
		var l struct {
			IDs        []int64 `json:"ids"`
			FirstError string  `json:"first_error"`
			Causes     []struct {
				Error string  `json:"error"`
				IDs   []int64 `json:"ids"`
			} `json:"causes"`
		}
		if err := json.Unmarshal([]byte(line[strings.Index(line, "{"):]), &l); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if l.FirstError != "" {
			for _, id := range l.IDs {
				said[id] = append(said[id], l.FirstError)
			}
		}
		for _, c := range l.Causes {
			for _, id := range c.IDs {
				said[id] = append(said[id], c.Error)
			}
		}
	}
	if len(said[odd]) != 1 || !strings.Contains(said[odd][0], missing) || strings.Contains(said[odd][0], "MESSAGE_TOO_LARGE") {
		t.Errorf("the log says row %d (missing topic %s) failed with %q", odd, missing, said[odd])
	}
	if len(said[big]) != 1 || !strings.Contains(said[big][0], "MESSAGE_TOO_LARGE") || strings.Contains(said[big][0], missing) {
		t.Errorf("the log says row %d (2 MiB value) failed with %q", big, said[big])
	}
}
