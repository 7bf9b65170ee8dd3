package integration

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/inbox"
	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// writeRow writes one row of value to db's outbox in a transaction of its
// own, under ctx (which may carry the writer's span).
func writeRow(t *testing.T, ctx context.Context, db *testenv.DB, topic, value string) {
	t.Helper()
	err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error {
		return db.Table.Write(ctx, tx, outbox.Message{Topic: topic, Key: []byte("acct-42"), Value: []byte(value),
			Headers: map[string]string{"type": "transfer"}})
	})
	if err != nil {
		t.Fatal(err)
	}
}

// TestOneTraceFromWriterThroughRelayToInbox: a writer writes a row inside
// its span; the relay, tracing on, publishes it in a transaction whose span
// continues the writer's trace and links the writer's span; the inbox,
// tracing on, runs the handler in a span that is a child of the writer's
// (the record kept its traceparent). One trace, end to end. A row written
// without a span in the same batch gets no trace header from the writer or
// the relay, and the inbox handles it in a trace of its own.
func TestOneTraceFromWriterThroughRelayToInbox(t *testing.T) {
	topic := testenv.RandomName("traced-")
	k := testenv.NewKafka(t, 3, topic)
	db := testenv.NewDB(t)
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	t.Cleanup(func() { _ = tp.Shutdown(context.Background()) })

	ctx, writer := tp.Tracer("payments-api").Start(context.Background(), "POST /transfers")
	writeRow(t, ctx, db, topic, "traced")
	writer.End()
	writeRow(t, context.Background(), db, topic, "untraced")

	// Both rows in one batch: the relay starts after they are written.
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k), relay.WithTracerProvider(tp), relay.WithLogger(testenv.Logger(t, nil)))

	sinkDB := testenv.NewDB(t)
	m, err := inbox.NewMigrator(sinkDB.Pool, "public", "inbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	var (
		mu      sync.Mutex
		handled = map[string]trace.SpanContext{} // value -> the span the handler ran in
		headers = map[string][]string{}          // value -> the record's header names
	)
	in, err := inbox.New(inbox.Config{Brokers: k.Brokers, Group: testenv.RandomName("ledger-"), Topics: []string{topic}}, sinkDB.Pool,
		func(ctx context.Context, _ pgx.Tx, ev *inbox.Event) error {
			mu.Lock()
			defer mu.Unlock()
			handled[string(ev.Value)] = trace.SpanContextFromContext(ctx)
			for _, h := range ev.Headers {
				headers[string(ev.Value)] = append(headers[string(ev.Value)], h.Key)
			}
			return nil
		}, inbox.WithTracerProvider(tp), inbox.WithLogger(testenv.Logger(t, nil)))
	if err != nil {
		t.Fatal(err)
	}
	runCtx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- in.Run(runCtx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("inbox: %v", err)
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		mu.Lock()
		n := len(handled)
		mu.Unlock()
		if n == 2 && in.Stats().Applied == 2 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the inbox handled %d of 2 events in 60 s", n)
		}
		time.Sleep(100 * time.Millisecond)
	}

	w := writer.SpanContext()
	byName := map[string][]tracetest.SpanStub{}
	for _, s := range spans.GetSpans() {
		byName[s.Name] = append(byName[s.Name], s)
	}
	txns := byName["outbox-relay transaction"]
	if len(txns) != 1 {
		t.Fatalf("%d relay transaction spans, want 1 (both rows in one transaction); spans: %v", len(txns), names(spans.GetSpans()))
	}
	tx := txns[0]
	if tx.SpanContext.TraceID() != w.TraceID() || tx.Parent.SpanID() != w.SpanID() {
		t.Errorf("the relay's transaction span is in trace %s under %s, want trace %s under the writer's span %s",
			tx.SpanContext.TraceID(), tx.Parent.SpanID(), w.TraceID(), w.SpanID())
	}
	if len(tx.Links) != 1 || tx.Links[0].SpanContext.SpanID() != w.SpanID() {
		t.Errorf("the relay's transaction span links %v, want exactly the writer's span %s", tx.Links, w.SpanID())
	}
	if tx.SpanKind != trace.SpanKindProducer {
		t.Errorf("the relay's span is of kind %v, want producer", tx.SpanKind)
	}
	process := byName["process "+topic]
	if len(process) != 2 {
		t.Fatalf("%d inbox spans, want 2; spans: %v", len(process), names(spans.GetSpans()))
	}
	mu.Lock()
	defer mu.Unlock()
	traced, untraced := handled["traced"], handled["untraced"]
	if traced.TraceID() != w.TraceID() {
		t.Errorf("the handler of the traced event ran in trace %s, want the writer's %s", traced.TraceID(), w.TraceID())
	}
	for _, p := range process {
		if p.SpanContext.SpanID() == traced.SpanID() && p.Parent.SpanID() != w.SpanID() {
			t.Errorf("the inbox span of the traced event has parent %s, want the writer's span %s", p.Parent.SpanID(), w.SpanID())
		}
	}
	if !untraced.IsValid() || untraced.TraceID() == w.TraceID() {
		t.Errorf("the handler of the untraced event ran in span %v: want a valid span in a trace of its own", untraced)
	}
	if got := strings.Join(headers["untraced"], ","); got != "outbox-id,outbox-event-id,type" {
		t.Errorf("the untraced record has headers %s, want outbox-id,outbox-event-id,type (no trace header added)", got)
	}
	if got := strings.Join(headers["traced"], ","); got != "outbox-id,outbox-event-id,traceparent,type" {
		t.Errorf("the traced record has headers %s, want outbox-id,outbox-event-id,traceparent,type", got)
	}
}

// TestNoTraceHeaderWhenTracingIsOff: with tracing off in the relay and a
// writer without a span, the record carries exactly the relay's and the
// row's headers; a writer's traceparent still goes through as it was
// written, for consumers that trace.
func TestNoTraceHeaderWhenTracingIsOff(t *testing.T) {
	topic := testenv.RandomName("untraced-")
	k := testenv.NewKafka(t, 3, topic)
	db := testenv.NewDB(t)
	spans := tracetest.NewInMemoryExporter()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(spans))
	ctx, writer := tp.Tracer("payments-api").Start(context.Background(), "POST /transfers")
	writeRow(t, ctx, db, topic, "traced")
	writer.End()
	writeRow(t, context.Background(), db, topic, "untraced")
	c := k.NewConsumer(t, topic)
	testenv.StartRelay(t, db, testenv.RelayConfig(db, k))
	seen := c.WaitFor(t, 2, 60*time.Second)
	if len(seen) != 2 {
		t.Fatalf("%d records, want 2", len(seen))
	}
	want := fmt.Sprintf("00-%s-%s-01", writer.SpanContext().TraceID(), writer.SpanContext().SpanID())
	for _, s := range seen {
		switch string(s.Value) {
		case "untraced":
			if _, ok := s.Headers["traceparent"]; ok || len(s.Headers) != 3 {
				t.Errorf("record of a row written without a span, tracing off: headers %v, want outbox-id, outbox-event-id and type only", s.Headers)
			}
		case "traced":
			if s.Headers["traceparent"] != want || len(s.Headers) != 4 {
				t.Errorf("record of a row written in a span: headers %v, want traceparent %s besides outbox-id, outbox-event-id and type", s.Headers, want)
			}
		}
	}
	if n := len(spans.GetSpans()); n != 1 {
		t.Errorf("%d spans recorded, want the writer's only: %v", n, names(spans.GetSpans()))
	}
}

func names(spans tracetest.SpanStubs) []string {
	out := make([]string, len(spans))
	for i, s := range spans {
		out[i] = s.Name
	}
	return out
}
