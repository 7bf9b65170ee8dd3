package main

import (
	"strings"
	"testing"
)

// TestEveryCommandRefusesUnknownVariables (issue 21 §3): run, reshard,
// migrate, status, dlq, verify and bench stop at start on an OUTBOX_*
// variable none of them reads, before connecting anywhere, with the name
// meant.
func TestEveryCommandRefusesUnknownVariables(t *testing.T) {
	env := []string{"OUTBOX_DATABASE_URL=postgres://relay@127.0.0.1:1/none", "OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OUTBOX_BATCHSIZE=50"}
	for _, args := range [][]string{{"run"}, {"reshard"}, {"migrate", "up"}, {"migrate", "status"}, {"migrate", "sql"}, {"status"},
		{"dlq", "list"}, {"verify"}, {"bench", "-rows", "10"}} {
		code, out, errs := cli(t, env, args...)
		if code == 0 || !strings.Contains(errs, "OUTBOX_BATCHSIZE is not a variable the relay reads: did you mean OUTBOX_BATCH_SIZE?") {
			t.Errorf("%v with OUTBOX_BATCHSIZE=50: exit %d, want non-zero with did you mean OUTBOX_BATCH_SIZE\n%s%s", args, code, out, errs)
		}
	}
}
