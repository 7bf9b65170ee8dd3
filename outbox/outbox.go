// Package outbox is the outbox table as a Go API: the [Message] an
// application writes inside its own transaction, and the queries the relay
// runs to read, mark and dead-letter rows.
//
// Writing a row with plain SQL from any language is a supported contract:
//
//	INSERT INTO outbox (topic, key, value, headers)
//	VALUES ('payments', 'acct-42', '{"amount":100}', '{"type":"transfer"}');
//
// Column event_id (a uuid, default gen_random_uuid()) may be set too, to an
// idempotency key of the application's.
//
// The relay publishes it once the writing transaction commits.
package outbox

import (
	"context"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
)

// Message is one Kafka record to publish.
type Message struct {
	// Topic is the Kafka topic. Required.
	Topic string
	// Key is the record key; nil for a keyless record. Rows of one key are
	// published in id order to one partition.
	Key []byte
	// Value is the record value; nil publishes a tombstone (a null value).
	Value []byte
	// Headers become Kafka record headers, next to the relay's own
	// "outbox-id" header, which is reserved (ReservedHeader). When the
	// context given to Write carries a span (OpenTelemetry), Write adds
	// its W3C trace context, "traceparent" (and "tracestate" when the
	// span has one), unless Headers sets "traceparent" already; without a
	// span nothing is added (TraceHeaders).
	Headers map[string]string
	// Partition, when set, is the Kafka partition; nil lets the relay choose
	// by Kafka's default murmur2 hash of the key.
	Partition *int32
	// EventID is the event's identity, a UUID (column event_id), which the
	// relay sends in the "outbox-event-id" header and the inbox
	// deduplicates by. Empty draws a random one (version 4). Set it
	// to an idempotency key of your own to make a retried business
	// operation one event: a consumer applies an event id once, whatever
	// table, database or row id it came from.
	EventID string
}

// Table names an outbox table: its schema and name, always quoted as
// identifiers.
type Table struct {
	Schema string
	Name   string
}

// DefaultTable is public.outbox.
var DefaultTable = Table{Schema: "public", Name: "outbox"}

func quoteIdent(s string) string { return `"` + strings.ReplaceAll(s, `"`, `""`) + `"` }

// Ident is the quoted, schema-qualified name of the table itself.
func (t Table) Ident() string { return t.ident("") }

// DeadLetterIdent is the quoted name of the dead-letter table.
func (t Table) DeadLetterIdent() string { return t.ident("_dead_letter") }

// InflightIdent is the quoted name of the at-most-once in-flight table.
func (t Table) InflightIdent() string { return t.ident("_inflight") }

// OwnerIdent is the quoted name of the shard-ownership lease table.
func (t Table) OwnerIdent() string { return t.ident("_owner") }

// StateIdent is the quoted name of the relay-state table.
func (t Table) StateIdent() string { return t.ident("_relay_state") }

func (t Table) ident(suffix string) string {
	return quoteIdent(t.Schema) + "." + quoteIdent(t.Name+suffix)
}

// pgIdentifier is the table's name in the form pgx's CopyFrom takes.
func (t Table) pgIdentifier() pgx.Identifier { return pgx.Identifier{t.Schema, t.Name} }

// String is schema.table, unquoted, for logs.
func (t Table) String() string { return t.Schema + "." + t.Name }

// Execer is the smallest part of pgx that writing needs: pgx.Tx, *pgx.Conn
// and *pgxpool.Pool all fit. Write inside the transaction of the business
// change, so the row commits, or not, with it.
type Execer interface {
	Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error)
}

// CopyExecer adds COPY, which WriteMany uses for large batches.
type CopyExecer interface {
	Execer
	CopyFrom(ctx context.Context, tableName pgx.Identifier, columnNames []string, rowSrc pgx.CopyFromSource) (int64, error)
}

// CopyThreshold is the batch size from which WriteMany uses COPY instead of
// a multi-row INSERT.
const CopyThreshold = 64

// ReservedHeader is the record header the relay sets to the row id (the
// "outbox-id" consumers deduplicate by). A row may not set it: the relay
// dead-letters such a row, and Write refuses such a Message.
const ReservedHeader = "outbox-id"

// ReservedEventHeader is the record header the relay sets to the row's
// event_id (EventHeader). A row may not set it either.
const ReservedEventHeader = "outbox-event-id"

// IsReservedEventHeader reports whether a header name would pass for the
// relay's outbox-event-id with a consumer that compares names loosely.
func IsReservedEventHeader(name string) bool {
	return strings.EqualFold(strings.TrimSpace(name), ReservedEventHeader)
}

// IsReservedHeader reports whether a header name would pass for the
// relay's outbox-id with a consumer that compares names loosely: any case,
// surrounding spaces ("Outbox-Id", "outbox-id ").
func IsReservedHeader(name string) bool {
	return strings.EqualFold(strings.TrimSpace(name), ReservedHeader)
}

// Validate reports the first problem with m that the relay would refuse, with
// the field and the fix.
func (m Message) Validate() error {
	if err := ValidTopic(m.Topic); err != nil {
		return err
	}
	if m.Partition != nil && *m.Partition < 0 {
		return fmt.Errorf("outbox message: Partition is %d: must be >= 0, or nil to hash the key", *m.Partition)
	}
	for k := range m.Headers {
		if IsReservedHeader(k) {
			return fmt.Errorf("outbox message: Headers sets %q, which is reserved (%q in any case, with or without spaces): the relay sends the row id in it; rename the header", k, ReservedHeader)
		}
		if IsReservedEventHeader(k) {
			return fmt.Errorf("outbox message: Headers sets %q, which is reserved (%q in any case, with or without spaces): the relay sends the event id in it; set EventID instead", k, ReservedEventHeader)
		}
	}
	if m.EventID != "" {
		if err := ValidEventID(m.EventID); err != nil {
			return fmt.Errorf("outbox message: EventID %q is not a UUID (column event_id is uuid): leave it empty for a random one, or derive a UUID from your key (e.g. a name-based UUID)", m.EventID)
		}
	}
	return nil
}

// ValidEventID reports whether s is a UUID in the form PostgreSQL prints
// (8-4-4-4-12 hexadecimal digits, either case), the form the relay sends.
func ValidEventID(s string) error {
	if len(s) != 36 {
		return fmt.Errorf("%q is %d characters, not a UUID of 36 (8-4-4-4-12 hexadecimal digits)", s, len(s))
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return fmt.Errorf("%q is not a UUID: want '-' at position %d", s, i+1)
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f' || c >= 'A' && c <= 'F') {
				return fmt.Errorf("%q is not a UUID: %q is not a hexadecimal digit", s, c)
			}
		}
	}
	return nil
}

// NewEventID returns a random (version 4) UUID, as gen_random_uuid does.
func NewEventID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // crypto/rand.Read never fails (Go 1.24)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	h := hex.EncodeToString(b[:])
	return h[0:8] + "-" + h[8:12] + "-" + h[12:16] + "-" + h[16:20] + "-" + h[20:]
}

// kafkaInternalTopics are the topics Kafka keeps for itself: a produce
// request to one is refused (INVALID_TOPIC_EXCEPTION).
var kafkaInternalTopics = []string{"__consumer_offsets", "__transaction_state", "__share_group_state", "__cluster_metadata"}

// ValidTopic reports whether topic is a legal Kafka topic name for a row: 1
// to 249 characters of ASCII letters, digits, '.', '_' and '-', not "." or
// "..", and not one of Kafka's internal topics.
func ValidTopic(topic string) error {
	switch {
	case topic == "":
		return errors.New("topic is empty: set the row's topic to a Kafka topic name")
	case len(topic) > 249:
		return fmt.Errorf("topic %.20q... is %d characters: Kafka allows 249", topic, len(topic))
	case topic == "." || topic == "..":
		return fmt.Errorf("topic %q is not allowed by Kafka", topic)
	case slices.Contains(kafkaInternalTopics, topic):
		return fmt.Errorf("topic %q is internal to Kafka (the brokers refuse produce requests to it): write the row to a topic of your own", topic)
	}
	for _, r := range topic {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '.' || r == '_' || r == '-') {
			return fmt.Errorf("topic %q has %q: Kafka topic names use only ASCII letters, digits, '.', '_' and '-'", topic, r)
		}
	}
	return nil
}

// HeaderTraceparent and HeaderTracestate are the W3C trace-context headers
// (https://www.w3.org/TR/trace-context/) a row carries its writer's span in.
const (
	HeaderTraceparent = "traceparent"
	HeaderTracestate  = "tracestate"
)

// TraceHeaders returns h with the W3C trace context of the span in ctx
// ("traceparent", and "tracestate" when not empty) added, through
// OpenTelemetry's TraceContext propagator. It returns h itself, unchanged,
// when ctx has no valid span or h sets "traceparent" already (the caller's
// own trace context wins), and a copy otherwise: the caller's map is never
// written. Write calls it for every message.
func TraceHeaders(ctx context.Context, h map[string]string) map[string]string {
	if !trace.SpanContextFromContext(ctx).IsValid() {
		return h
	}
	if _, ok := h[HeaderTraceparent]; ok {
		return h
	}
	out := make(map[string]string, len(h)+2)
	for k, v := range h {
		out[k] = v
	}
	propagation.TraceContext{}.Inject(ctx, propagation.MapCarrier(out))
	return out
}

func headersJSON(h map[string]string) ([]byte, error) {
	if h == nil {
		return nil, nil
	}
	b, err := json.Marshal(h)
	if err != nil {
		return nil, fmt.Errorf("encode headers: %w", err)
	}
	return b, nil
}

func (t Table) insertSQL(n int) string {
	var b strings.Builder
	b.WriteString("INSERT INTO " + t.Ident() + " (topic, key, value, headers, partition, event_id) VALUES ")
	for i := range n {
		if i > 0 {
			b.WriteString(", ")
		}
		p := i * cols
		fmt.Fprintf(&b, "($%d, $%d, $%d, $%d::jsonb, $%d, $%d::uuid)", p+1, p+2, p+3, p+4, p+5, p+6)
	}
	return b.String()
}

// cols is how many columns Write sets per row.
const cols = 6

func args(ctx context.Context, msgs []Message) ([]any, error) {
	out := make([]any, 0, cols*len(msgs))
	for i, m := range msgs {
		if err := m.Validate(); err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		h, err := headersJSON(TraceHeaders(ctx, m.Headers))
		if err != nil {
			return nil, fmt.Errorf("message %d: %w", i, err)
		}
		var hv any
		if h != nil {
			hv = string(h)
		}
		ev := m.EventID
		if ev == "" {
			ev = NewEventID()
		}
		out = append(out, m.Topic, m.Key, m.Value, hv, m.Partition, ev)
	}
	return out, nil
}

// Write inserts msgs into the outbox inside the caller's transaction (or any
// Execer) with one multi-row INSERT. Nothing is published until that
// transaction commits; a rollback discards the rows with the business change.
func (t Table) Write(ctx context.Context, db Execer, msgs ...Message) error {
	if len(msgs) == 0 {
		return nil
	}
	a, err := args(ctx, msgs)
	if err != nil {
		return err
	}
	if _, err := db.Exec(ctx, t.insertSQL(len(msgs)), a...); err != nil {
		return fmt.Errorf("write outbox rows to %s: %w", t, err)
	}
	return nil
}

// WriteMany inserts msgs like Write, using COPY when there are at least
// CopyThreshold of them.
func (t Table) WriteMany(ctx context.Context, db CopyExecer, msgs []Message) error {
	if len(msgs) < CopyThreshold {
		return t.Write(ctx, db, msgs...)
	}
	a, err := args(ctx, msgs)
	if err != nil {
		return err
	}
	rows := make([][]any, len(msgs))
	for i := range msgs {
		row := a[cols*i : cols*i+cols]
		if row[3] != nil {
			row[3] = json.RawMessage(row[3].(string))
		}
		rows[i] = row
	}
	names := []string{"topic", "key", "value", "headers", "partition", "event_id"}
	if _, err := db.CopyFrom(ctx, t.pgIdentifier(), names, pgx.CopyFromRows(rows)); err != nil {
		return fmt.Errorf("copy outbox rows to %s: %w", t, err)
	}
	return nil
}

// WriteSQL inserts msgs inside a database/sql transaction, for applications
// that use database/sql (with the pgx stdlib driver or lib/pq).
func (t Table) WriteSQL(ctx context.Context, tx *sql.Tx, msgs ...Message) error {
	if len(msgs) == 0 {
		return nil
	}
	a, err := args(ctx, msgs)
	if err != nil {
		return err
	}
	for i := range a {
		if p, ok := a[i].(*int32); ok {
			if p == nil {
				a[i] = nil
			} else {
				a[i] = int64(*p)
			}
		}
		if b, ok := a[i].([]byte); ok && b == nil {
			a[i] = nil
		}
	}
	if _, err := tx.ExecContext(ctx, t.insertSQL(len(msgs)), a...); err != nil {
		return fmt.Errorf("write outbox rows to %s: %w", t, err)
	}
	return nil
}
