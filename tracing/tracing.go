// Package tracing carries W3C trace context (traceparent, tracestate)
// through Kafka record headers with OpenTelemetry's TraceContext
// propagator: the relay links its transaction spans to the spans of the
// rows' writers (package txn), and the inbox starts its handler's span as a
// child of the writer's (package inbox).
//
// Nothing here is global: tracers come from the trace.TracerProvider the
// caller passes in, and a nil provider means tracing is off, at no cost
// (see Tracer). Package tracing/otlpenv builds a provider from the standard
// OTEL_* environment for the binary.
package tracing

import (
	"context"

	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"go.opentelemetry.io/otel/trace/noop"
)

// Scope is the instrumentation scope of outbox-relay's tracers.
const Scope = "github.com/outbox-relay/outbox-relay"

// Tracer returns tp's tracer of outbox-relay, or nil when tp is nil or a
// no-op provider: callers skip every span then (no span, no context, no
// allocation).
func Tracer(tp trace.TracerProvider) trace.Tracer {
	if tp == nil {
		return nil
	}
	if _, ok := tp.(noop.TracerProvider); ok {
		return nil
	}
	return tp.Tracer(Scope)
}

// Headers is a propagation.TextMapCarrier over Kafka record headers. Get
// returns the first header of a name.
type Headers struct{ H *[]kgo.RecordHeader }

// Get returns the value of the first header named key, or "".
func (h Headers) Get(key string) string {
	for _, rh := range *h.H {
		if rh.Key == key {
			return string(rh.Value)
		}
	}
	return ""
}

// Set replaces the first header named key, or appends one.
func (h Headers) Set(key, value string) {
	for i, rh := range *h.H {
		if rh.Key == key {
			(*h.H)[i].Value = []byte(value)
			return
		}
	}
	*h.H = append(*h.H, kgo.RecordHeader{Key: key, Value: []byte(value)})
}

// Keys lists the header names.
func (h Headers) Keys() []string {
	out := make([]string, 0, len(*h.H))
	for _, rh := range *h.H {
		out = append(out, rh.Key)
	}
	return out
}

// SpanContext is the remote span context the headers carry (traceparent
// and tracestate), or an invalid one when they carry none or a malformed
// one.
func SpanContext(headers []kgo.RecordHeader) trace.SpanContext {
	return trace.SpanContextFromContext(Extract(context.Background(), headers))
}

// Extract returns ctx with the remote span context the headers carry as
// its parent, or ctx itself when they carry none.
func Extract(ctx context.Context, headers []kgo.RecordHeader) context.Context {
	if !hasTraceparent(headers) {
		return ctx
	}
	return propagation.TraceContext{}.Extract(ctx, Headers{H: &headers})
}

func hasTraceparent(headers []kgo.RecordHeader) bool {
	for _, h := range headers {
		if h.Key == "traceparent" {
			return true
		}
	}
	return false
}
