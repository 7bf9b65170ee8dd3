package outbox_test

import (
	"context"
	"database/sql"
	"encoding/json"
	"fmt"
	"testing"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/outbox"
)

// spanContext returns ctx with a sampled span context and a tracestate.
func spanContext(t *testing.T) (context.Context, trace.SpanContext) {
	t.Helper()
	ts, err := trace.ParseTraceState("vendor=abc")
	if err != nil {
		t.Fatal(err)
	}
	sc := trace.NewSpanContext(trace.SpanContextConfig{
		TraceID:    trace.TraceID{0x4b, 0xf9, 0x2f, 0x35, 0x77, 0xb3, 0x4d, 0xa6, 0xa3, 0xce, 0x92, 0x9d, 0x0e, 0x0e, 0x47, 0x36},
		SpanID:     trace.SpanID{0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7},
		TraceFlags: trace.FlagsSampled,
		TraceState: ts,
	})
	return trace.ContextWithSpanContext(context.Background(), sc), sc
}

// TestTraceHeadersCarryTheWritersSpan: a context with a span adds
// traceparent and tracestate (W3C form), without touching the caller's
// map; a writer's own traceparent wins; without a span nothing is added.
func TestTraceHeadersCarryTheWritersSpan(t *testing.T) {
	ctx, sc := spanContext(t)
	mine := map[string]string{"type": "transfer"}
	got := outbox.TraceHeaders(ctx, mine)
	want := fmt.Sprintf("00-%s-%s-01", sc.TraceID(), sc.SpanID())
	if got["traceparent"] != want || got["tracestate"] != "vendor=abc" || got["type"] != "transfer" {
		t.Fatalf("TraceHeaders = %v, want traceparent %s, tracestate vendor=abc and type", got, want)
	}
	if len(mine) != 1 {
		t.Fatalf("the caller's map was written: %v", mine)
	}
	own := map[string]string{"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
	if got := outbox.TraceHeaders(ctx, own); got["traceparent"] != own["traceparent"] || len(got) != 1 {
		t.Fatalf("a writer's own traceparent was replaced: %v", got)
	}
	if got := outbox.TraceHeaders(context.Background(), nil); got != nil {
		t.Fatalf("no span, no headers: got %v, want nil", got)
	}
	if got := outbox.TraceHeaders(context.Background(), mine); len(got) != 1 {
		t.Fatalf("no span: got %v, want the headers unchanged", got)
	}
}

// TestEveryWritePathStoresTheTraceContext: Write, WriteMany (COPY) and
// WriteSQL (database/sql) put the span's traceparent into the row's
// headers; rows written without a span keep headers NULL.
func TestEveryWritePathStoresTheTraceContext(t *testing.T) {
	db := testenv.NewDB(t)
	ctx, sc := spanContext(t)
	want := fmt.Sprintf("00-%s-%s-01", sc.TraceID(), sc.SpanID())
	many := make([]outbox.Message, outbox.CopyThreshold)
	for i := range many {
		many[i] = outbox.Message{Topic: "copy"}
	}
	if err := db.Table.Write(ctx, db.Pool, outbox.Message{Topic: "write"}); err != nil {
		t.Fatal(err)
	}
	if err := pgx.BeginFunc(ctx, db.Pool, func(tx pgx.Tx) error { return db.Table.WriteMany(ctx, tx, many) }); err != nil {
		t.Fatal(err)
	}
	sqldb := stdlib.OpenDBFromPool(db.Pool)
	defer sqldb.Close()
	tx, err := sqldb.BeginTx(ctx, &sql.TxOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := db.Table.WriteSQL(ctx, tx, outbox.Message{Topic: "sql"}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := db.Table.Write(context.Background(), db.Pool, outbox.Message{Topic: "plain"}); err != nil {
		t.Fatal(err)
	}
	rows, err := db.Pool.Query(context.Background(), `SELECT topic, headers FROM `+db.Table.Ident()+` ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var topic string
	var headers []byte
	n := 0
	_, err = pgx.ForEachRow(rows, []any{&topic, &headers}, func() error {
		n++
		if topic == "plain" {
			if headers != nil {
				t.Errorf("row written without a span has headers %s, want NULL", headers)
			}
			return nil
		}
		var h map[string]string
		if err := json.Unmarshal(headers, &h); err != nil || h["traceparent"] != want || h["tracestate"] != "vendor=abc" {
			t.Errorf("row of %s has headers %s, want traceparent %s and tracestate vendor=abc", topic, headers, want)
		}
		return nil
	})
	if err != nil || n != 3+outbox.CopyThreshold {
		t.Fatalf("read %d rows, %v", n, err)
	}
}

// BenchmarkTraceHeaders compares what Write pays per message for trace
// context: off (no span in ctx: one lookup, the headers untouched) and on
// (a copy of the headers with traceparent and tracestate).
func BenchmarkTraceHeaders(b *testing.B) {
	h := map[string]string{"type": "transfer"}
	traced := trace.ContextWithSpanContext(context.Background(), trace.NewSpanContext(trace.SpanContextConfig{
		TraceID: trace.TraceID{1}, SpanID: trace.SpanID{1}, TraceFlags: trace.FlagsSampled}))
	b.Run("off", func(b *testing.B) {
		ctx := context.Background()
		for b.Loop() {
			_ = outbox.TraceHeaders(ctx, h)
		}
	})
	b.Run("on", func(b *testing.B) {
		for b.Loop() {
			_ = outbox.TraceHeaders(traced, h)
		}
	})
}
