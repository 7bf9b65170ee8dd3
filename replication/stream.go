package replication

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pglogrepl"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgproto3"
)

// Position is where a stream starts: what the last committed Kafka
// transaction's checkpoint recorded. The zero Position is a first start.
type Position struct {
	// SystemID is the database cluster's system identifier.
	SystemID string
	// Timeline is the timeline the position was read on.
	Timeline int32
	// EndLSN is the end LSN of the last PostgreSQL transaction Kafka holds
	// (or the last idle position a checkpoint recorded).
	EndLSN LSN
	// RowIndex, when not 0, says that Kafka holds only the first RowIndex
	// rows of the transaction ending at EndLSN (one too large for a batch,
	// split): the stream starts at CommitLSN, the start of that
	// transaction's commit record, so that the server sends it again, and
	// skips those rows.
	RowIndex int
	// CommitLSN is the start of the commit record of the transaction ending
	// at EndLSN; needed when RowIndex is not 0.
	CommitLSN LSN
}

// resume is where replication starts for p: its end, or, for a part of a
// transaction, the start of that transaction's commit record.
func (p Position) resume() LSN {
	if p.RowIndex > 0 {
		return p.CommitLSN
	}
	return p.EndLSN
}

// Config says what to read.
type Config struct {
	// ConnString is the database's connection string (URL or key=value);
	// the stream adds replication=database.
	ConnString string
	// BeforeConnect, if set, is called with the parsed configuration
	// before each connection: short-lived credentials (package pgauth)
	// set the password there.
	BeforeConnect func(context.Context, *pgconn.Config) error
	// Slot is the logical replication slot's name.
	Slot string
	// Publication is the pgoutput publication's name.
	Publication string
	// Table is the outbox table.
	Table Table
	// StatusInterval is how often the confirmed position is sent to the
	// server when nothing asks sooner (default 10 s; keep it under
	// wal_sender_timeout).
	StatusInterval time.Duration
}

// ErrHistory is returned when the server is not the history the checkpoint
// was written on: another system identifier, a timeline that forked before
// the checkpoint's position, a slot that is ahead of what Kafka holds, or
// WAL the slot needs that is gone. The relay stops: skipping by an LSN of
// another history would lose or repeat events.
var ErrHistory = errors.New("replication: not the history of the checkpoint")

// ErrNoSlot is returned when the slot does not exist.
var ErrNoSlot = errors.New("replication: slot does not exist")

// Stream is one replication connection reading committed transactions.
// It is not safe for concurrent use.
type Stream struct {
	cfg      Config
	conn     *pgconn.PgConn
	dec      *Decoder
	system   pglogrepl.IdentifySystemResult
	start    LSN       // transactions ending at or before it are skipped (C4)
	partial  Position  // a transaction of which the first rows are held
	handed   LSN       // end of the last transaction handed out
	serverAt LSN       // the last keepalive's position
	confirm  LSN       // what the caller said Kafka holds (C3)
	sent     LSN       // the flush position last sent
	nextSend time.Time // when the next status update is due
}

// Open connects, checks the server against from (C6) and the slot against
// from (C3), and starts replication at from.EndLSN (C5). A zero from starts
// at the slot's confirmed position.
func Open(ctx context.Context, cfg Config, from Position) (*Stream, error) {
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = 10 * time.Second
	}
	pc, err := pgconn.ParseConfig(cfg.ConnString)
	if err != nil {
		return nil, fmt.Errorf("replication connection string: %w", err)
	}
	pc.RuntimeParams["replication"] = "database"
	// Text-format values are decoded as ISO dates in UTC.
	pc.RuntimeParams["DateStyle"] = "ISO"
	pc.RuntimeParams["TimeZone"] = "UTC"
	if cfg.BeforeConnect != nil {
		if err := cfg.BeforeConnect(ctx, pc); err != nil {
			return nil, fmt.Errorf("replication connection credentials: %w", err)
		}
	}
	conn, err := pgconn.ConnectConfig(ctx, pc)
	if err != nil {
		return nil, fmt.Errorf("replication connection: %w", err)
	}
	s := &Stream{cfg: cfg, conn: conn, dec: NewDecoder(cfg.Table)}
	if err := s.open(ctx, from); err != nil {
		conn.Close(context.Background())
		return nil, err
	}
	return s, nil
}

func (s *Stream) open(ctx context.Context, from Position) error {
	sys, err := pglogrepl.IdentifySystem(ctx, s.conn)
	if err != nil {
		return fmt.Errorf("identify system: %w", err)
	}
	s.system = sys
	if err := s.sameHistory(ctx, from); err != nil {
		return err
	}
	slot, err := ReadSlot(ctx, s.conn, s.cfg.Slot)
	if errors.Is(err, ErrNoSlot) && from.EndLSN != 0 {
		return fmt.Errorf("%w: slot %q does not exist, but the checkpoint is at %s: it was dropped (or this server is not the one it was on, a fail-over before PostgreSQL 17): the events since the checkpoint cannot be read from any slot; see docs/replication.md, \"Replication recovery\"",
			ErrHistory, s.cfg.Slot, from.resume())
	}
	if err != nil {
		return err
	}
	if slot.WALStatus == "lost" {
		return fmt.Errorf("%w: slot %q has lost WAL it needs (wal_status lost): events since %s cannot be read; see docs/replication.md, \"Replication recovery\"", ErrHistory, s.cfg.Slot, slot.ConfirmedFlush)
	}
	if from.RowIndex > 0 && (from.CommitLSN == 0 || from.CommitLSN >= from.EndLSN) {
		return fmt.Errorf("%w: a checkpoint of part of a transaction needs its commit LSN before its end (got %s, %s)", ErrProtocol, from.CommitLSN, from.EndLSN)
	}
	start := from.resume()
	if from.EndLSN == 0 {
		start = slot.ConfirmedFlush
	} else if slot.ConfirmedFlush > start {
		// The relay confirms only what a committed checkpoint holds: a slot
		// ahead of the checkpoint was moved by someone else (or dropped and
		// made again), and the server would silently skip to it.
		return fmt.Errorf("%w: slot %q is confirmed to %s, past the checkpoint's %s: the events between would be skipped; was the slot advanced or created again? see docs/replication.md, \"Replication recovery\"",
			ErrHistory, s.cfg.Slot, slot.ConfirmedFlush, start)
	}
	s.start, s.handed, s.confirm, s.sent = start, start, start, 0
	if from.RowIndex > 0 {
		s.partial = from
	}
	err = pglogrepl.StartReplication(ctx, s.conn, s.cfg.Slot, start, pglogrepl.StartReplicationOptions{
		PluginArgs: []string{"proto_version '1'", "publication_names " + quoteLiteral(s.cfg.Publication)},
	})
	if err != nil {
		var pe *pgconn.PgError
		if errors.As(err, &pe) && pe.Code == "55006" {
			return fmt.Errorf("%w: %s", ErrSlotBusy, pe.Message)
		}
		return fmt.Errorf("start replication on slot %q at %s: %w", s.cfg.Slot, start, err)
	}
	return nil
}

// sameHistory is C6: the system identifier must match, and the checkpoint's
// position must lie on the current timeline's history.
func (s *Stream) sameHistory(ctx context.Context, from Position) error {
	if from.SystemID != "" && from.SystemID != s.system.SystemID {
		return fmt.Errorf("%w: the checkpoint was written on database system %s, this server is system %s (a restore or another cluster): reset the checkpoint on purpose, see docs/replication.md, \"Replication recovery\"",
			ErrHistory, from.SystemID, s.system.SystemID)
	}
	if from.Timeline == 0 || from.Timeline == s.system.Timeline {
		return nil
	}
	if from.Timeline > s.system.Timeline {
		return fmt.Errorf("%w: the checkpoint was written on timeline %d, this server is on timeline %d", ErrHistory, from.Timeline, s.system.Timeline)
	}
	h, err := pglogrepl.TimelineHistory(ctx, s.conn, s.system.Timeline)
	if err != nil {
		return fmt.Errorf("timeline history %d: %w", s.system.Timeline, err)
	}
	switchAt, ok := parseHistory(h.Content, from.Timeline)
	if !ok {
		return fmt.Errorf("%w: timeline %d's history does not name timeline %d of the checkpoint", ErrHistory, s.system.Timeline, from.Timeline)
	}
	if from.EndLSN > switchAt {
		return fmt.Errorf("%w: the checkpoint's position %s on timeline %d is past where timeline %d forked from it (%s): Kafka holds events the promoted server never had",
			ErrHistory, from.EndLSN, from.Timeline, s.system.Timeline, switchAt)
	}
	return nil
}

// parseHistory finds in a timeline history file the LSN where timeline tli
// ended.
func parseHistory(content []byte, tli int32) (LSN, bool) {
	sc := bufio.NewScanner(bytes.NewReader(content))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 || strings.HasPrefix(f[0], "#") {
			continue
		}
		n, err := strconv.ParseInt(f[0], 10, 32)
		if err != nil || int32(n) != tli {
			continue
		}
		lsn, err := pglogrepl.ParseLSN(f[1])
		if err != nil {
			return 0, false
		}
		return lsn, true
	}
	return 0, false
}

// Lost reports whether err means the connection is gone (a restart of the
// server, a walsender ended by a take-over): open a new stream at the last
// committed checkpoint.
func Lost(err error) bool {
	if errors.Is(err, ErrSchema) || errors.Is(err, ErrProtocol) || errors.Is(err, ErrHistory) {
		return false
	}
	var pe *pgconn.PgError
	if !errors.As(err, &pe) {
		return true
	}
	// 08: connection exception; 57: operator intervention (a terminated
	// backend, a shutdown); 53: insufficient resources.
	return strings.HasPrefix(pe.Code, "08") || strings.HasPrefix(pe.Code, "57") || strings.HasPrefix(pe.Code, "53")
}

// System is the server's identity: its system identifier and timeline.
func (s *Stream) System() (systemID string, timeline int32) {
	return s.system.SystemID, s.system.Timeline
}

// Start is the position the stream started at (for a checkpoint of part of
// a transaction, the start of that transaction's commit record).
func (s *Stream) Start() LSN { return s.start }

// Event is what Next returns: a committed transaction, or (Txn nil) an idle
// position: every transaction ending at or before Idle has been handed out
// and none is open, so once Kafka holds everything handed out, a checkpoint
// may record Idle and the slot be confirmed to it without skipping anything.
type Event struct {
	Txn  *Txn
	Idle LSN
}

// Next returns the next committed transaction after the start position, or
// an idle position when the server reports progress past the last one and
// no transaction is open. It sends the confirmed position when due.
func (s *Stream) Next(ctx context.Context) (Event, error) {
	for {
		if err := s.sendIfDue(ctx, false); err != nil {
			return Event{}, err
		}
		rctx, cancel := context.WithDeadline(ctx, s.nextSend)
		msg, err := s.conn.ReceiveMessage(rctx)
		cancel()
		if err != nil {
			if ctx.Err() == nil && pgconn.Timeout(err) {
				continue
			}
			return Event{}, fmt.Errorf("replication receive: %w", err)
		}
		switch m := msg.(type) {
		case *pgproto3.CopyData:
			ev, err := s.copyData(ctx, m.Data)
			if err != nil {
				return Event{}, err
			}
			if ev.Txn != nil || ev.Idle != 0 {
				return ev, nil
			}
		case *pgproto3.ErrorResponse:
			return Event{}, fmt.Errorf("replication stream: %w", pgconn.ErrorResponseToPgError(m))
		case *pgproto3.CopyDone:
			return Event{}, fmt.Errorf("replication stream: the server ended the stream")
		default:
			// NoticeResponse and the like: nothing to do.
		}
	}
}

func (s *Stream) copyData(ctx context.Context, data []byte) (Event, error) {
	if len(data) == 0 {
		return Event{}, nil
	}
	switch data[0] {
	case pglogrepl.PrimaryKeepaliveMessageByteID:
		k, err := pglogrepl.ParsePrimaryKeepaliveMessage(data[1:])
		if err != nil {
			return Event{}, fmt.Errorf("%w: keepalive: %v", ErrProtocol, err)
		}
		if k.ReplyRequested {
			if err := s.sendIfDue(ctx, true); err != nil {
				return Event{}, err
			}
		}
		if !s.dec.InTransaction() && k.ServerWALEnd > s.handed && k.ServerWALEnd > s.serverAt {
			s.serverAt = k.ServerWALEnd
			return Event{Idle: k.ServerWALEnd}, nil
		}
	case pglogrepl.XLogDataByteID:
		x, err := pglogrepl.ParseXLogData(data[1:])
		if err != nil {
			return Event{}, fmt.Errorf("%w: xlog data: %v", ErrProtocol, err)
		}
		t, err := s.dec.Decode(x.WALData)
		if err != nil {
			return Event{}, err
		}
		if t == nil {
			return Event{}, nil
		}
		if t.EndLSN <= s.start {
			// C4: already held by the checkpoint the stream started at.
			return Event{}, nil
		}
		if p := s.partial; p.RowIndex > 0 {
			s.partial = Position{}
			if t.EndLSN != p.EndLSN || len(t.Rows) < p.RowIndex {
				return Event{}, fmt.Errorf("%w: the checkpoint holds the first %d rows of the transaction ending at %s, but the stream resumed with a transaction ending at %s with %d rows",
					ErrHistory, p.RowIndex, p.EndLSN, t.EndLSN, len(t.Rows))
			}
			t.Skip = p.RowIndex
		}
		if t.EndLSN <= s.handed {
			return Event{}, fmt.Errorf("%w: transaction %d ends at %s, not after the previous one (%s)", ErrProtocol, t.Xid, t.EndLSN, s.handed)
		}
		s.handed = t.EndLSN
		if len(t.Rows) == 0 {
			// A transaction of no outbox row (PostgreSQL 14 and older send
			// the Begin and Commit of every transaction): a position, as
			// a keepalive's.
			return Event{Idle: t.EndLSN}, nil
		}
		return Event{Txn: t}, nil
	}
	return Event{}, nil
}

// Confirm says that committed Kafka transactions hold everything up to lsn
// (a transaction's EndLSN or an idle position Next returned). The slot is
// confirmed to it with the next status update (C3). It never goes back.
func (s *Stream) Confirm(lsn LSN) {
	if lsn > s.confirm {
		s.confirm = lsn
	}
}

// Flush sends the confirmed position now.
func (s *Stream) Flush(ctx context.Context) error { return s.sendIfDue(ctx, true) }

func (s *Stream) sendIfDue(ctx context.Context, now bool) error {
	if !now && time.Now().Before(s.nextSend) && s.confirm == s.sent {
		return nil
	}
	if !now && time.Now().Before(s.nextSend) {
		return nil
	}
	// All three positions are set explicitly (C3; pglogrepl would copy the
	// write position into a zero flush position).
	err := pglogrepl.SendStandbyStatusUpdate(ctx, s.conn, pglogrepl.StandbyStatusUpdate{
		WALWritePosition: s.confirm,
		WALFlushPosition: s.confirm,
		WALApplyPosition: s.confirm,
		ClientTime:       time.Now(),
	})
	if err != nil {
		return fmt.Errorf("standby status update: %w", err)
	}
	s.sent = s.confirm
	s.nextSend = time.Now().Add(s.cfg.StatusInterval)
	return nil
}

// Close ends the stream. The confirmed position is sent first.
func (s *Stream) Close(ctx context.Context) error {
	err := s.sendIfDue(ctx, true)
	if cerr := s.conn.Close(ctx); err == nil {
		err = cerr
	}
	return err
}

func quoteLiteral(s string) string { return "'" + strings.ReplaceAll(s, "'", "''") + "'" }
