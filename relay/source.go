package relay

import (
	"context"
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
