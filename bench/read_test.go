package bench

import (
	"context"
	"crypto/rand"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// BenchmarkReadBatch: the relay's read of one batch of unpublished rows, from
// a table of 20 000 (the same first batch every time: the query's own cost,
// with the rows in PostgreSQL's cache). "bounded" is outbox.Store.ReadBatch
// with the default OUTBOX_BATCH_MAX_BYTES (16 MiB, never reached here, so
// both variants return the same rows); "rows-only" is the read before the
// byte bound (ReadBatch with maxBytes 0 runs that query). Every iteration
// runs both, in turns, so machine noise hits both alike; bounded/rows-only
// is the throughput ratio.
// value=8KiB values are stored out of line (TOAST).
//
// held/skip compares the bounded read under OUTBOX_DEAD_LETTER_ORDER=hold-key
// (every candidate row probes the dead-letter table's held index, empty
// here: the cost every relay pays when nothing is dead-lettered) with the
// same read under skip, also in turns.
//
//	go test -run '^$' -bench ReadBatch -benchtime 2s -count 3 ./bench/
func BenchmarkReadBatch(b *testing.B) {
	ctx := context.Background()
	for _, size := range []int{len(value), 8 << 10} {
		name := "value=" + strconv.Itoa(size) + "B"
		if size == 8<<10 {
			name = "value=8KiB"
		}
		db := testenv.NewDB(b)
		v := value
		if size != len(value) {
			v = make([]byte, size)
			_, _ = rand.Read(v) // incompressible: stored out of line
		}
		msgs := messages(20000)
		for i := range msgs {
			msgs[i].Value = v
		}
		for i := 0; i < len(msgs); i += 5000 {
			if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
				return db.Table.WriteMany(ctx, tx, msgs[i:i+5000])
			}); err != nil {
				b.Fatal(err)
			}
		}
		if _, err := db.Pool.Exec(ctx, `VACUUM ANALYZE outbox`); err != nil {
			b.Fatal(err)
		}
		st := outbox.NewStore(db.Pool, db.Table).WithDeadLetterOrder(outbox.Skip)
		held := st.WithDeadLetterOrder(outbox.HoldKey)
		for _, batch := range []int{100, 500} {
			b.Run(name+"/batch="+strconv.Itoa(batch), func(b *testing.B) {
				// Both reads in every iteration, in turns, each timed alone.
				var took [3]time.Duration
				for b.Loop() {
					for i, maxBytes := range []int64{0, 16 << 20, 16 << 20} {
						read := st
						if i == 2 {
							read = held
						}
						start := time.Now()
						rows, err := read.ReadBatch(ctx, 0, 1, batch, maxBytes)
						took[i] += time.Since(start)
						if err != nil {
							b.Fatal(err)
						}
						if len(rows) != batch {
							b.Fatalf("read %d rows, want %d", len(rows), batch)
						}
					}
				}
				n := float64(b.N * batch)
				b.ReportMetric(n/took[0].Seconds(), "rows-only-rows/s")
				b.ReportMetric(n/took[1].Seconds(), "bounded-rows/s")
				b.ReportMetric(took[0].Seconds()/took[1].Seconds(), "bounded/rows-only")
				b.ReportMetric(took[1].Seconds()/took[2].Seconds(), "held/skip")
			})
		}
	}
}
