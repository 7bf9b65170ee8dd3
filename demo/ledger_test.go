package demo

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// TestTwoLedgersStartedAtOnceBothSetUp: two `demo-ledger` processes started
// at the same moment both run SetupLedger on a schema that does not exist
// yet. Both must succeed (neither may exit on the other's CREATE SCHEMA or
// CREATE TABLE), and the accounts are created once.
func TestTwoLedgersStartedAtOnceBothSetUp(t *testing.T) {
	ctx := context.Background()
	url := testenv.CreateDatabase(t)
	pools := make([]*pgxpool.Pool, 2)
	for i := range pools {
		p, err := pgxpool.New(ctx, url)
		if err != nil {
			t.Fatal(err)
		}
		defer p.Close()
		pools[i] = p
	}
	for round := range 15 {
		schema := fmt.Sprintf("ledger_race_%d", round)
		var wg sync.WaitGroup
		errs := make([]error, len(pools))
		start := make(chan struct{})
		for i, p := range pools {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[i] = SetupLedger(ctx, p, schema, 5)
			}()
		}
		close(start)
		wg.Wait()
		for i, err := range errs {
			if err != nil {
				t.Fatalf("round %d: ledger %d of 2 started at once failed: %v", round, i+1, err)
			}
		}
		var n int
		if err := pools[0].QueryRow(ctx, `SELECT count(*) FROM `+schema+`.`+LedgerAccounts).Scan(&n); err != nil || n != 5 {
			t.Fatalf("round %d: %d accounts (%v), want 5", round, n, err)
		}
	}
}
