package relay

import (
	"context"
	"errors"
	"log/slog"

	"github.com/outbox-relay/outbox-relay/txn"
)

// The sources of rows (OUTBOX_SOURCE).
const (
	sourcePoll        = "poll"
	sourceReplication = "replication"
)

// A source feeds a shard's publish loop, after recovery fenced the shard's
// producer: the poll read of the outbox table (marks after each commit), or
// a logical replication slot (package replication: no marks, the
// checkpoint's LSN is the position).
type source interface {
	// run publishes the shard's rows until ctx ends or an error stops it.
	run(ctx context.Context, s int32, l *lease, p *txn.Producer, log *slog.Logger, healthy func()) error
}

// pollSource is the publish loop over the outbox table's unpublished rows.
type pollSource struct{ r *Relay }

func (ps pollSource) run(ctx context.Context, s int32, l *lease, p *txn.Producer, log *slog.Logger, healthy func()) error {
	return ps.r.publishLoop(ctx, s, l, p, log, healthy)
}

// source is the configured source.
func (r *Relay) source() source {
	if r.cfg.Source == sourceReplication {
		return walSource{r}
	}
	return pollSource{r}
}

// errSwitchBack: a poll relay found a checkpoint of the replication source.
var errSwitchBack = errors.New("the shard's last checkpoint was written by OUTBOX_SOURCE=replication, which does not mark rows: the poll read would publish them again. Switching back to poll is not supported yet: keep OUTBOX_SOURCE=replication, or start poll with a new OUTBOX_CHECKPOINT_TOPIC after marking the published rows yourself")

// checkSourceSwitch refuses a checkpoint this source cannot continue from.
func (r *Relay) checkSourceSwitch(cp *txn.Checkpoint) error {
	if cp.Source == sourceReplication && r.cfg.Source != sourceReplication {
		return errSwitchBack
	}
	return nil
}
