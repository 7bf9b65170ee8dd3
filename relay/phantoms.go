package relay

import (
	"context"
	"log/slog"
	"slices"
	"strconv"

	"github.com/outbox-relay/outbox-relay/txn"
)

// historyChanged compares the database's history (system identifier and
// timeline, read by this recovery) with the one the checkpoint recorded.
// When they differ, the database is not the one the checkpoint was
// written on: a fail-over to a standby or a restore happened since, and
// the rows of the window it no longer has (gone) are events Kafka holds of
// transactions this database never had. It says so and returns them.
func (r *Relay) historyChanged(ctx context.Context, cp *txn.Checkpoint, ids []int64, log *slog.Logger) ([]int64, error) {
	now := r.history.Load()
	if cp.SystemID == "" || now == nil || (cp.SystemID == now.SystemID && cp.Timeline == now.Timeline) {
		return nil, nil
	}
	what := "a fail-over to a standby (promotion) or a point-in-time recovery: a new timeline"
	if cp.SystemID != now.SystemID {
		what = "a restore into another cluster: a new system identifier"
	}
	log.Warn("the database's history changed since the shard's last checkpoint: "+what,
		"checkpoint_system_id", cp.SystemID, "system_id", now.SystemID, "checkpoint_timeline", cp.Timeline, "timeline", now.Timeline)
	if len(ids) == 0 {
		return nil, nil
	}
	return r.store.Gone(ctx, ids)
}

// reportPhantoms reports the rows of the checkpoint's window that Kafka
// holds and the database does not: gone after a change of history, or
// replaced by other rows under the same id (another created_at). Every id
// is listed: a consumer's ledger must reverse each of them, and one that
// deduplicates by outbox-id would drop the new row that reuses it.
func (r *Relay) reportPhantoms(s int32, window, gone, replaced []int64, log *slog.Logger) {
	phantoms := slices.Concat(gone, replaced)
	if len(phantoms) == 0 {
		return
	}
	slices.Sort(phantoms)
	phantoms = slices.Compact(phantoms)
	r.m.Phantoms.WithLabelValues(strconv.Itoa(int(s))).Add(float64(len(phantoms)))
	log.Error("phantom events: Kafka holds rows that this database does not have (gone, or another row under the same id): "+
		"their transactions did not survive the fail-over or restore; reverse them downstream (see docs/operations.md, \"Fail-over to a standby\")",
		"phantoms", len(phantoms), "phantom_ids", phantoms, "gone", len(gone), "replaced", len(replaced),
		"window_rows_checked", len(window), "window_first_id", slices.Min(window), "window_last_id", slices.Max(window))
}
