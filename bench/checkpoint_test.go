package bench

import (
	"context"
	"encoding/json"
	"io"
	"log/slog"
	"strconv"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// BenchmarkCheckpointBytesPerRow measures what a row costs in the checkpoint
// record: the real relay (exactly-once, OUTBOX_BATCH_SIZE=500,
// OUTBOX_RECOVERY_WINDOW=8) publishes 20 000 rows (CHECKPOINT_ROWS;
// b.N is not used: the figure is a size, not a time), written either by COPY in
// transactions of 10 000 rows (one created_at per transaction) or by
// single-row transactions from four connections (every row its own
// created_at, microseconds apart, and ids not in created_at order), and the
// benchmark reads every committed checkpoint record back from Kafka. It
// reports, over the records whose window is full (8 batches), the record's
// bytes per row it lists (the JSON record with its envelope: the window is
// base64 in it) and the window's own bytes per row (the varint deltas).
//
//	go test -run '^$' -bench CheckpointBytesPerRow -benchtime 1x ./bench/
func BenchmarkCheckpointBytesPerRow(b *testing.B) {
	for _, writer := range []string{"copy", "single-row"} {
		b.Run("writer="+writer, func(b *testing.B) {
			b.StopTimer()
			ctx := context.Background()
			n := envInt(b, "CHECKPOINT_ROWS", 20000)
			db := testenv.NewDB(b)
			k := testenv.NewKafka(b, 3, topic)
			if writer == "copy" {
				insert(b, db, n)
			} else {
				insertSingleRows(b, db, n, 4)
			}
			cfg := testenv.RelayConfig(db, k)
			cfg.BatchSize = 500
			cfg.RecoveryWindow = 8
			b.StartTimer()
			testenv.StartRelay(b, db, cfg, relay.WithLogger(slog.New(slog.NewTextHandler(io.Discard, nil))))
			deadline := time.Now().Add(5 * time.Minute)
			for db.Unpublished(b) > 0 {
				if time.Now().After(deadline) {
					b.Fatalf("%d rows unpublished after 5 minutes", db.Unpublished(b))
				}
				time.Sleep(50 * time.Millisecond)
			}
			b.StopTimer()

			cl, err := kgo.NewClient(kgo.SeedBrokers(k.Brokers...), kgo.ConsumeTopics(cfg.CheckpointTopic),
				kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
			if err != nil {
				b.Fatal(err)
			}
			defer cl.Close()
			var records, fullRecords, rows, recordBytes, windowBytes, fullRows int
			pctx, cancel := context.WithTimeout(ctx, time.Minute)
			defer cancel()
			for rows < n && pctx.Err() == nil {
				cl.PollFetches(pctx).EachRecord(func(r *kgo.Record) {
					var cp txn.Checkpoint
					if err := json.Unmarshal(r.Value, &cp); err != nil {
						b.Fatalf("checkpoint at offset %d: %v", r.Offset, err)
					}
					w, err := cp.RecoveryWindow(cfg.RecoveryWindow, 0)
					if err != nil {
						b.Fatal(err)
					}
					records++
					rs := w.Rows()
					if len(rs) > 0 {
						rows = max(rows, int(rs[len(rs)-1].ID))
					}
					if w.Batches() == cfg.RecoveryWindow {
						fullRecords++
						fullRows += len(rs)
						recordBytes += len(r.Key) + len(r.Value)
						windowBytes += len(cp.Window)
					}
				})
			}
			if fullRecords == 0 {
				b.Fatalf("no checkpoint with a full window among %d records (%d rows too few for 8 batches of 500?)", records, n)
			}
			b.ReportMetric(float64(recordBytes)/float64(fullRows), "record-bytes/row")
			b.ReportMetric(float64(windowBytes)/float64(fullRows), "window-bytes/row")
			b.ReportMetric(float64(recordBytes)/float64(fullRecords), "record-bytes")
		})
	}
}

// insertSingleRows writes n rows, one per transaction, from conns
// connections at once, as an application's writers do.
func insertSingleRows(b *testing.B, db *testenv.DB, n, conns int) {
	b.Helper()
	ctx := context.Background()
	errs := make(chan error, conns)
	for c := range conns {
		go func() {
			conn, err := pgx.Connect(ctx, db.URL)
			if err != nil {
				errs <- err
				return
			}
			defer conn.Close(ctx)
			for i := c; i < n; i += conns {
				if _, err := conn.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, $2, $3)`,
					topic, []byte("acct-"+strconv.Itoa(i%1000)), value); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	for range conns {
		if err := <-errs; err != nil {
			b.Fatal(err)
		}
	}
}
