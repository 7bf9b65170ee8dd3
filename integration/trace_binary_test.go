package integration

import (
	"context"
	"encoding/hex"
	"io"
	"net/http"
	"net/http/httptest"
	"os/exec"
	"sync"
	"syscall"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	collector "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/protobuf/proto"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
)

// otlpCollector is an OTLP/HTTP trace receiver: it decodes every export
// request it gets on /v1/traces.
type otlpCollector struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs []*collector.ExportTraceServiceRequest
	bad  []string
}

func newOTLPCollector(t *testing.T) *otlpCollector {
	c := &otlpCollector{}
	c.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		var req collector.ExportTraceServiceRequest
		err := proto.Unmarshal(body, &req)
		c.mu.Lock()
		defer c.mu.Unlock()
		if r.URL.Path != "/v1/traces" || err != nil {
			c.bad = append(c.bad, r.URL.Path+": "+r.Header.Get("Content-Type"))
			w.WriteHeader(http.StatusBadRequest)
			return
		}
		c.reqs = append(c.reqs, &req)
		w.Header().Set("Content-Type", "application/x-protobuf")
		b, _ := proto.Marshal(&collector.ExportTraceServiceResponse{})
		_, _ = w.Write(b)
	}))
	t.Cleanup(c.srv.Close)
	return c
}

// span finds a span of name and the service.name of its resource.
func (c *otlpCollector) span(name string) (*tracepb.Span, string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, req := range c.reqs {
		for _, rs := range req.ResourceSpans {
			service := ""
			for _, a := range rs.GetResource().GetAttributes() {
				if a.Key == "service.name" {
					service = a.GetValue().GetStringValue()
				}
			}
			for _, ss := range rs.ScopeSpans {
				for _, s := range ss.Spans {
					if s.Name == name {
						return s, service
					}
				}
			}
		}
	}
	return nil, ""
}

// TestBinaryExportsTransactionSpansOverOTLP drives `outbox-relay run` with
// the standard OTEL_* variables only: the relay exports its transaction's
// span over OTLP/HTTP to the collector, in the writer's trace and linked to
// the writer's span, under OTEL_SERVICE_NAME; then it stops cleanly.
func TestBinaryExportsTransactionSpansOverOTLP(t *testing.T) {
	bin := buildRelayBinary(t)
	topic := testenv.RandomName("otlp-")
	k := testenv.NewKafka(t, 3, topic)
	db := testenv.NewDB(t)
	col := newOTLPCollector(t)

	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(tracetest.NewInMemoryExporter()))
	ctx, writer := tp.Tracer("payments-api").Start(context.Background(), "POST /transfers")
	writeRow(t, ctx, db, topic, "traced")
	writer.End()

	env := append(relayProcessEnv(db, k, testenv.RandomName("relay-"), testenv.RandomName("checkpoints-")),
		"OTEL_EXPORTER_OTLP_ENDPOINT="+col.srv.URL,
		"OTEL_SERVICE_NAME=relay-e2e",
		"OTEL_BSP_SCHEDULE_DELAY=100",
	)
	logs := &testenv.SyncBuffer{}
	cmd := exec.Command(bin, "run")
	cmd.Env, cmd.Stderr = env, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Kill()
	}()

	var span *tracepb.Span
	var service string
	for deadline := time.Now().Add(60 * time.Second); span == nil; {
		if time.Now().After(deadline) {
			t.Fatalf("no span \"outbox-relay transaction\" reached the collector in 60 s (bad requests %v); relay log:\n%s", col.bad, logs.String())
		}
		time.Sleep(200 * time.Millisecond)
		span, service = col.span("outbox-relay transaction")
	}
	w := writer.SpanContext()
	if hex.EncodeToString(span.TraceId) != w.TraceID().String() || hex.EncodeToString(span.ParentSpanId) != w.SpanID().String() {
		t.Errorf("exported span in trace %x under %x, want the writer's trace %s under its span %s", span.TraceId, span.ParentSpanId, w.TraceID(), w.SpanID())
	}
	if len(span.Links) != 1 || hex.EncodeToString(span.Links[0].SpanId) != w.SpanID().String() {
		t.Errorf("exported span links %v, want the writer's span %s", span.Links, w.SpanID())
	}
	if span.Kind != tracepb.Span_SPAN_KIND_PRODUCER || service != "relay-e2e" {
		t.Errorf("exported span of kind %v, service %q; want producer, relay-e2e (OTEL_SERVICE_NAME)", span.Kind, service)
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("outbox-relay run after SIGTERM: %v\n%s", err, logs.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("outbox-relay run did not stop within 60 s of SIGTERM")
	}
}
