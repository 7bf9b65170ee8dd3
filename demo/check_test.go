package demo

import (
	"encoding/json"
	"strconv"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/txn"
)

// The checker itself must catch what it claims to catch.
func TestCheckerCatchesDuplicatesGapsMovesAndLosses(t *testing.T) {
	rec := func(outboxID int64, part int32, tr Transfer) *kgo.Record {
		v, _ := json.Marshal(tr)
		return &kgo.Record{Topic: Topic, Partition: part, Key: []byte(strconv.Itoa(tr.From)), Value: v,
			Headers: []kgo.RecordHeader{{Key: txn.HeaderOutboxID, Value: []byte(strconv.FormatInt(outboxID, 10))}}}
	}
	c := newChecker()
	now := time.Now()
	for id := int64(1); id <= 5; id++ {
		c.committed(id, now.Add(-time.Minute))
	}
	c.record(rec(1, 0, Transfer{TransferID: 1, From: 7, To: 8, Seq: 1}))
	c.record(rec(1, 0, Transfer{TransferID: 1, From: 7, To: 8, Seq: 1})) // the same row again
	c.record(rec(2, 0, Transfer{TransferID: 2, From: 7, To: 8, Seq: 3})) // seq 2 skipped
	c.record(rec(3, 1, Transfer{TransferID: 3, From: 7, To: 8, Seq: 4})) // another partition
	c.record(rec(9, 0, Transfer{TransferID: 6, From: 9, To: 8, Seq: 1})) // consumed, never committed
	// transfers 4 and 5: committed a minute ago, never consumed.
	got := c.snapshot(missingGrace)
	if got.verified != 4 || got.duplicates != 1 || got.outOfOrder != 2 || got.missing != 2 || got.early != 1 {
		t.Fatalf("verified=%d duplicates=%d out_of_order=%d missing=%d early=%d; want 4, 1, 2, 2, 1\nproblems: %q",
			got.verified, got.duplicates, got.outOfOrder, got.missing, got.early, got.problems)
	}
	if len(got.missingIDs) != 2 || got.missingIDs[0] != 4 || got.missingIDs[1] != 5 {
		t.Errorf("missing ids %v, want [4 5]", got.missingIDs)
	}
	if _, ok := c.caughtUp(); ok {
		t.Error("caughtUp with two transfers missing")
	}
}
