// Package replication reads an outbox table's inserts from a PostgreSQL
// logical replication slot (pgoutput) as whole committed transactions, in
// commit order, each with the end LSN of its commit record.
//
// It is the read side of OUTBOX_SOURCE=replication. Its rules, named after
// the invariants in the design study (CDC-STUDY.md):
//
//   - C2: a transaction is handed out only when its Commit has been received,
//     whole, with its rows in the order the transaction inserted them.
//   - C3: the slot is confirmed only up to a position the caller says is
//     held by committed Kafka transactions; every standby status update sets
//     the write, flush and apply positions explicitly.
//   - C4: on a (re)start at a checkpoint's end LSN, a transaction is skipped
//     if and only if its end LSN is at or before that position. Change LSNs
//     are never compared: only commit end LSNs are ordered globally.
//   - C5: replication starts at the checkpoint's end LSN, never at 0/0.
//   - C6: the server's system identifier and timeline are checked against
//     the checkpoint's before anything is read.
//   - C10: columns are found by name in the latest Relation message of the
//     table; a missing column stops the stream, it is never guessed.
//   - C11: message payloads are copied before the next receive.
package replication

import (
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/outbox-relay/outbox-relay/outbox"
)

// LSN is a position in PostgreSQL's write-ahead log.
type LSN = pglogrepl.LSN

// Txn is one committed PostgreSQL transaction's outbox rows.
type Txn struct {
	// EndLSN is the end of the transaction's commit record
	// (pgoutput's TransactionEndLSN): the position a checkpoint records and
	// the slot is confirmed to once Kafka holds the transaction.
	EndLSN LSN
	// CommitLSN is the start of the commit record.
	CommitLSN LSN
	// CommitTime is when the transaction committed, by the server's clock.
	CommitTime time.Time
	// Xid is the transaction's id.
	Xid uint32
	// Rows are the outbox rows the transaction inserted, in insert order.
	// A transaction that inserted none (pgoutput sends empty transactions on
	// PostgreSQL 14 and older) has none.
	Rows []outbox.Row
	// Skip is how many of Rows Kafka already holds: the stream resumed in
	// the middle of this transaction, which was split across batches.
	Skip int
}

// ErrSchema is returned when the outbox table's Relation message lacks a
// column the relay needs, or a column has a type it cannot decode: the
// stream stops rather than guess (C10).
var ErrSchema = errors.New("replication: outbox table schema")

// ErrProtocol is returned for a pgoutput message out of place (a change
// outside a transaction, a Commit that does not match its Begin).
var ErrProtocol = errors.New("replication: pgoutput protocol")

// Table names the outbox table in the stream.
type Table struct {
	Schema string
	Name   string
}

// relation is what a Relation message says about the outbox table: the
// position of each column the relay reads.
type relation struct {
	id      uint32
	ours    bool
	columns []*pglogrepl.RelationMessageColumn
	// index of each needed column, -1 when absent (only for optional ones).
	id_, topic, key, value, headers, partition, createdAt int
	// eventID is the index of event_id, -1 on a table from before
	// migration 7 (its rows have no event id).
	eventID int
}

var required = []string{"id", "topic", "key", "value", "headers", "partition", "created_at"}

func newRelation(m *pglogrepl.RelationMessage, t Table) (*relation, error) {
	r := &relation{id: m.RelationID, ours: m.Namespace == t.Schema && m.RelationName == t.Name, columns: m.Columns}
	if !r.ours {
		return r, nil
	}
	at := map[string]int{}
	for i, c := range m.Columns {
		at[c.Name] = i
	}
	idx := make([]int, len(required))
	for i, name := range required {
		j, ok := at[name]
		if !ok {
			return nil, fmt.Errorf("%w: %s.%s has no column %q in the replication stream (relation %d): the relay stops rather than guess; restore the column or run `outbox-relay migrate up`",
				ErrSchema, t.Schema, t.Name, name, m.RelationID)
		}
		idx[i] = j
	}
	r.id_, r.topic, r.key, r.value, r.headers, r.partition, r.createdAt = idx[0], idx[1], idx[2], idx[3], idx[4], idx[5], idx[6]
	r.eventID = -1
	if j, ok := at["event_id"]; ok {
		r.eventID = j
	}
	return r, nil
}

// Decoder turns pgoutput protocol version 1 messages into committed
// transactions. It holds no connection: Stream feeds it.
type Decoder struct {
	table     Table
	types     *pgtype.Map
	relations map[uint32]*relation
	open      *Txn
}

// NewDecoder returns a decoder for the outbox table t.
func NewDecoder(t Table) *Decoder {
	return &Decoder{table: t, types: pgtype.NewMap(), relations: map[uint32]*relation{}}
}

// InTransaction reports whether a Begin has been received whose Commit has
// not: a keepalive's position must not be confirmed then.
func (d *Decoder) InTransaction() bool { return d.open != nil }

// Reset drops a transaction received in part, as after a lost connection:
// the server sends it again, whole, from the slot's restart position.
func (d *Decoder) Reset() { d.open = nil }

// Decode reads one pgoutput message (the WAL data of one XLogData). It
// returns the transaction when the message is its Commit, nil otherwise.
// The message's bytes are not kept: rows own copies of their values.
func (d *Decoder) Decode(data []byte) (*Txn, error) {
	msg, err := pglogrepl.Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%w: parse: %v", ErrProtocol, err)
	}
	switch m := msg.(type) {
	case *pglogrepl.BeginMessage:
		if d.open != nil {
			return nil, fmt.Errorf("%w: Begin of xid %d inside open xid %d", ErrProtocol, m.Xid, d.open.Xid)
		}
		d.open = &Txn{Xid: m.Xid, CommitLSN: m.FinalLSN, CommitTime: m.CommitTime}
	case *pglogrepl.RelationMessage:
		r, err := newRelation(m, d.table)
		if err != nil {
			return nil, err
		}
		d.relations[m.RelationID] = r
	case *pglogrepl.InsertMessage:
		if d.open == nil {
			return nil, fmt.Errorf("%w: Insert outside a transaction", ErrProtocol)
		}
		r, ok := d.relations[m.RelationID]
		if !ok {
			return nil, fmt.Errorf("%w: Insert into relation %d before its Relation message", ErrProtocol, m.RelationID)
		}
		if !r.ours {
			return nil, nil
		}
		row, err := d.row(r, m.Tuple)
		if err != nil {
			return nil, err
		}
		d.open.Rows = append(d.open.Rows, row)
	case *pglogrepl.CommitMessage:
		if d.open == nil {
			return nil, fmt.Errorf("%w: Commit outside a transaction", ErrProtocol)
		}
		if m.CommitLSN != d.open.CommitLSN {
			return nil, fmt.Errorf("%w: Commit at %s for a Begin that announced %s", ErrProtocol, m.CommitLSN, d.open.CommitLSN)
		}
		t := d.open
		d.open = nil
		t.EndLSN = m.TransactionEndLSN
		t.CommitTime = m.CommitTime
		return t, nil
	case *pglogrepl.LogicalDecodingMessage:
		// Messages are not outbox events (yet): pgoutput sends them only
		// when asked (messages 'true'), which the stream does not.
	default:
		// Origin, Type, Update, Delete, Truncate: the publication publishes
		// inserts only; anything else says nothing about outbox rows.
	}
	return nil, nil
}

func (d *Decoder) row(r *relation, tuple *pglogrepl.TupleData) (outbox.Row, error) {
	var row outbox.Row
	if tuple == nil || len(tuple.Columns) != len(r.columns) {
		return row, fmt.Errorf("%w: an insert into %s.%s carries %d columns, its Relation message %d", ErrSchema, d.table.Schema, d.table.Name, columnCount(tuple), len(r.columns))
	}
	col := func(i int, dst any) (bool, error) {
		c := tuple.Columns[i]
		switch c.DataType {
		case pglogrepl.TupleDataTypeNull:
			return false, nil
		case pglogrepl.TupleDataTypeToast:
			return false, fmt.Errorf("%w: column %q arrived as unchanged TOAST in an insert", ErrSchema, r.columns[i].Name)
		}
		format := int16(pgtype.TextFormatCode)
		if c.DataType == pglogrepl.TupleDataTypeBinary {
			format = pgtype.BinaryFormatCode
		}
		if err := d.types.Scan(r.columns[i].DataType, format, c.Data, dst); err != nil {
			return false, fmt.Errorf("%w: column %q (type oid %d): %v", ErrSchema, r.columns[i].Name, r.columns[i].DataType, err)
		}
		return true, nil
	}
	if ok, err := col(r.id_, &row.ID); err != nil || !ok {
		return row, errOr(err, "id is NULL")
	}
	if ok, err := col(r.topic, &row.Topic); err != nil || !ok {
		return row, errOr(err, "topic is NULL")
	}
	if _, err := col(r.key, &row.Key); err != nil {
		return row, err
	}
	if _, err := col(r.value, &row.Value); err != nil {
		return row, err
	}
	var headers string
	if ok, err := col(r.headers, &headers); err != nil {
		return row, err
	} else if ok {
		row.Headers = []byte(headers)
	}
	var partition int32
	if ok, err := col(r.partition, &partition); err != nil {
		return row, err
	} else if ok {
		row.Partition = &partition
	}
	if ok, err := col(r.createdAt, &row.CreatedAt); err != nil || !ok {
		return row, errOr(err, "created_at is NULL")
	}
	if r.eventID >= 0 {
		var ev string
		if ok, err := col(r.eventID, &ev); err != nil {
			return row, err
		} else if ok {
			row.EventID = ev
		}
	}
	return row, nil
}

func errOr(err error, msg string) error {
	if err != nil {
		return err
	}
	return fmt.Errorf("%w: %s", ErrSchema, msg)
}

func columnCount(t *pglogrepl.TupleData) int {
	if t == nil {
		return 0
	}
	return len(t.Columns)
}
