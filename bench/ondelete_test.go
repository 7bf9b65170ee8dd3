package bench

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// BenchmarkMarkOrDelete: the database side of the publish loop with the
// relay's own statements, in mark mode and in delete mode
// (OUTBOX_ON_PUBLISH), on the same freshly loaded rows, rounds interleaved:
// ReadBatch of 1,000 rows, then MarkCommitted of them (by id and
// created_at, under the lease), until the table has none left. It reports
// rows/s of each and delete/mark, the ratio.
//
//	BENCH_ROWS=100000 go test -run '^$' -bench MarkOrDelete -benchtime 1x ./bench/
func BenchmarkMarkOrDelete(b *testing.B) {
	rows := envInt(b, "BENCH_ROWS", 100000)
	db := testenv.NewDB(b)
	ctx := context.Background()
	for range b.N {
		var rate [2]float64
		for i, p := range []outbox.OnPublish{outbox.Mark, outbox.Delete} {
			load(b, db, rows, 200)
			st := outbox.NewStore(db.Pool, db.Table).WithOnPublish(p)
			l, err := st.TakeLease(ctx, db.Pool, 0, "bench")
			if err != nil {
				b.Fatal(err)
			}
			start := time.Now()
			n := 0
			for {
				batch, err := st.ReadBatch(ctx, 0, 1, 1000, 0)
				if err != nil {
					b.Fatal(err)
				}
				if len(batch) == 0 {
					break
				}
				ids := make([]int64, len(batch))
				created := make([]time.Time, len(batch))
				for j, r := range batch {
					ids[j], created[j] = r.ID, r.CreatedAt
				}
				if _, err := st.MarkCommitted(ctx, l, ids, created); err != nil {
					b.Fatal(err)
				}
				n += len(batch)
			}
			if n != rows {
				b.Fatalf("%s drained %d rows, want %d", p, n, rows)
			}
			rate[i] = float64(n) / time.Since(start).Seconds()
		}
		b.ReportMetric(rate[0], "mark-rows/s")
		b.ReportMetric(rate[1], "delete-rows/s")
		b.ReportMetric(rate[1]/rate[0], "delete/mark")
	}
}
