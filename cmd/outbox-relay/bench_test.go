package main

import (
	"strings"
	"testing"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestBenchPrintsTheFiguresAndLeavesNothingBehind: a small `outbox-relay
// bench` against a real PostgreSQL and Kafka over TCP prints the ceiling,
// the relay, their ratio and the latency percentiles, every row arrived
// once, and no scratch schema or topic is left.
func TestBenchPrintsTheFiguresAndLeavesNothingBehind(t *testing.T) {
	url := testenv.CreateDatabase(t)
	k := testenv.NewKafka(t, 3)
	env := []string{"OUTBOX_DATABASE_URL=" + url, "OUTBOX_KAFKA_BROKERS=" + strings.Join(k.Brokers, ",")}
	code, out, errs := cli(t, env, "bench", "-rows", "3000", "-batch", "500", "-rounds", "2", "-rate", "400", "-latency-duration", "1s")
	if code != 0 {
		t.Fatalf("bench: exit %d\n%s\nstderr: %s", code, out, errs)
	}
	t.Logf("bench output:\n%s", out)
	for _, want := range []string{"scratch: schema outbox_bench_", "ceiling-mark", "relay ", "ratio", "a topic of its own", "-r2", "p50", "p99", "every row exactly once: yes", "removed schema outbox_bench_"} {
		if !strings.Contains(out, want) {
			t.Errorf("bench output lacks %q:\n%s", want, out)
		}
	}
	testenv.RequireNoBenchScratchLeft(t, url, k.Brokers)
}

// TestBenchRefusesBadFlagsNamingThem: bad flags are refused before anything
// is created, each named with the fix.
func TestBenchRefusesBadFlagsNamingThem(t *testing.T) {
	env := []string{"OUTBOX_DATABASE_URL=postgres://nobody@127.0.0.1:1/none", "OUTBOX_KAFKA_BROKERS=127.0.0.1:1"}
	code, _, errs := cli(t, env, "bench", "-rows", "0", "-on-publish", "drop", "-delivery", "twice", "-skip-latency", "-skip-throughput")
	if code == 0 {
		t.Fatal("bench with bad flags exited 0")
	}
	for _, want := range []string{"-rows 0", "-on-publish \"drop\": expected mark", "-delivery", "leave nothing to measure"} {
		if !strings.Contains(errs, want) {
			t.Errorf("the error lacks %q: %s", want, errs)
		}
	}
}
