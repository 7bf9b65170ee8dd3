package tracing_test

import (
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace/noop"

	"github.com/outbox-relay/outbox-relay/tracing"
)

// TestSpanContextFromRecordHeaders reads the W3C traceparent and tracestate
// of Kafka headers, and nothing from headers without one or a malformed one.
func TestSpanContextFromRecordHeaders(t *testing.T) {
	hs := []kgo.RecordHeader{
		{Key: "outbox-id", Value: []byte("7")},
		{Key: "traceparent", Value: []byte("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")},
		{Key: "tracestate", Value: []byte("vendor=abc")},
	}
	sc := tracing.SpanContext(hs)
	if !sc.IsValid() || !sc.IsRemote() || sc.TraceID().String() != "0af7651916cd43dd8448eb211c80319c" ||
		sc.SpanID().String() != "b7ad6b7169203331" || !sc.IsSampled() || sc.TraceState().Get("vendor") != "abc" {
		t.Fatalf("span context %+v", sc)
	}
	if sc := tracing.SpanContext(hs[:1]); sc.IsValid() {
		t.Fatalf("headers without traceparent gave %+v", sc)
	}
	bad := []kgo.RecordHeader{{Key: "traceparent", Value: []byte("00-zz-b7ad6b7169203331-01")}}
	if sc := tracing.SpanContext(bad); sc.IsValid() {
		t.Fatalf("a malformed traceparent gave %+v", sc)
	}
	var out []kgo.RecordHeader
	c := tracing.Headers{H: &out}
	c.Set("traceparent", "a")
	c.Set("traceparent", "b")
	if len(out) != 1 || c.Get("traceparent") != "b" || len(c.Keys()) != 1 {
		t.Fatalf("carrier: %v", out)
	}
}

// TestTracerIsNilWhenOff: no provider, or a no-op one, means no tracer, so
// callers skip spans entirely.
func TestTracerIsNilWhenOff(t *testing.T) {
	if tracing.Tracer(nil) != nil || tracing.Tracer(noop.NewTracerProvider()) != nil {
		t.Fatal("a tracer for a nil or no-op provider")
	}
	if tracing.Tracer(sdktrace.NewTracerProvider()) == nil {
		t.Fatal("no tracer for an SDK provider")
	}
}
