package txn

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/tracing"
)

// startSpan starts the span of one batch of recs (a Kafka transaction, or
// a batch sent outside one), a producer span linked to the span context of
// every record that carries one (the writer's traceparent header, each
// once). When every such record belongs to one trace, the span is a child
// of the first of them, so that writer, relay and consumer make one trace;
// rows of several traces in one batch make it a new root, linked to all.
func (p *Producer) startSpan(ctx context.Context, name string, recs []Record) (context.Context, trace.Span) {
	var (
		links  []trace.Link
		parent trace.SpanContext
		mixed  bool
		seen   = map[trace.SpanID]bool{}
	)
	for _, r := range recs {
		sc := tracing.SpanContext(r.Headers)
		if !sc.IsValid() {
			continue
		}
		if !parent.IsValid() {
			parent = sc
		} else if sc.TraceID() != parent.TraceID() {
			mixed = true
		}
		if seen[sc.SpanID()] {
			continue
		}
		seen[sc.SpanID()] = true
		links = append(links, trace.Link{SpanContext: sc, Attributes: []attribute.KeyValue{attribute.Int64("outbox.id", r.ID)}})
	}
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindProducer),
		trace.WithLinks(links...),
		trace.WithAttributes(
			attribute.String("messaging.system", "kafka"),
			attribute.String("messaging.operation.type", "send"),
			attribute.Int("messaging.batch.message_count", len(recs)),
			attribute.Int("outbox.shard", int(p.shard)),
			attribute.String("outbox.delivery", string(p.cfg.Settings.Mode)),
		),
	}
	if len(recs) > 0 {
		opts = append(opts, trace.WithAttributes(
			attribute.Int64("outbox.first_id", recs[0].ID),
			attribute.Int64("outbox.last_id", recs[len(recs)-1].ID)))
	}
	if p.cfg.Settings.Mode.Transactional() {
		opts = append(opts, trace.WithAttributes(attribute.String("messaging.kafka.transactional_id", p.cfg.TransactionalID(p.shard))))
	}
	if parent.IsValid() && !mixed {
		ctx = trace.ContextWithRemoteSpanContext(ctx, parent)
	} else {
		opts = append(opts, trace.WithNewRoot())
	}
	return p.cfg.Tracer.Start(ctx, name, opts...)
}

// endSpan ends span with err's status.
func endSpan(span trace.Span, err error) {
	if err != nil {
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	}
	span.End()
}
