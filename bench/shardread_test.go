package bench

import (
	"context"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// BenchmarkShardRead: one shard's read of a batch (outbox.Store.ReadBatch,
// the relay's bounded read under hold-key, through pgx's statement cache,
// so generic plans after the fifth execution) from a table of 200,000
// unpublished rows (104-byte values, keys over 1000 accounts, one in ten
// rows keyless) split into 4 shards, in two databases loaded alike: one
// without the shard index (each read walks the unpublished-id index and
// tests every row's hash: about 4 rows visited per row read) and one with
// it (outbox.Table.ShardIndexSQL: one ordered range). Every iteration reads
// each of the 4 shards from both, in turns, each read timed alone, so
// machine noise hits both alike; index/no-index is the throughput ratio.
//
//	go test -run '^$' -bench ShardRead -benchtime 3s -count 3 ./bench/
func BenchmarkShardRead(b *testing.B) {
	const rows, shards = 200000, 4
	ctx := context.Background()
	load := func(withIndex bool) *outbox.Store {
		db := testenv.NewDB(b)
		for done := 0; done < rows; done += 10000 {
			msgs := make([]outbox.Message, 10000)
			for i := range msgs {
				msgs[i] = outbox.Message{Topic: topic, Value: value}
				if (done+i)%10 != 0 {
					msgs[i].Key = []byte("acct-" + strconv.Itoa((done+i)%1000))
				}
			}
			if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, msgs) }); err != nil {
				b.Fatal(err)
			}
		}
		if withIndex {
			if built, err := outbox.CreateShardIndex(ctx, db.Pool, db.Table, shards); err != nil || !built {
				b.Fatalf("shard index: built %v, %v", built, err)
			}
		}
		if _, err := db.Pool.Exec(ctx, `VACUUM ANALYZE outbox`); err != nil {
			b.Fatal(err)
		}
		return outbox.NewStore(db.Pool, db.Table)
	}
	without, with := load(false), load(true)
	for _, batch := range []int{500, 1000} {
		b.Run("batch="+strconv.Itoa(batch), func(b *testing.B) {
			var took [2]time.Duration
			for b.Loop() {
				for shard := range shards {
					for i, st := range []*outbox.Store{without, with} {
						start := time.Now()
						got, err := st.ReadBatch(ctx, shard, shards, batch, 16<<20)
						took[i] += time.Since(start)
						if err != nil {
							b.Fatal(err)
						}
						if len(got) != batch {
							b.Fatalf("shard %d: read %d rows, want %d", shard, len(got), batch)
						}
					}
				}
			}
			n := float64(b.N * shards * batch)
			b.ReportMetric(n/took[0].Seconds(), "no-index-rows/s")
			b.ReportMetric(n/took[1].Seconds(), "index-rows/s")
			b.ReportMetric(took[0].Seconds()/took[1].Seconds(), "index/no-index")
		})
	}
}
