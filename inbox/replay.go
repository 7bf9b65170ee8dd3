package inbox

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"
)

var (
	// ErrNoDeadLetter: Replay was given an id the dead-letter table does
	// not hold (never there, or replayed already).
	ErrNoDeadLetter = errors.New("inbox: no such dead letter")
	// ErrNoDedupeKey: the dead letter is a record without a valid
	// outbox-id, so a replay could not be deduplicated; apply it by hand
	// and delete the row.
	ErrNoDedupeKey = errors.New("inbox: the dead letter has no outbox-id, so it cannot be replayed exactly once")
)

// Replay applies one dead letter (the id column of <table>_dead_letter)
// with the inbox's handler, after the cause is fixed: one transaction runs
// the handler, records the event as applied and deletes the dead-letter
// row. If the event's (topic, outbox-id) was applied meanwhile (a second
// copy of it arrived and succeeded), the handler is not run, the row is
// deleted, and Replay returns false. A handler error rolls back and is
// returned; the dead letter stays.
//
// Replay needs no Run and no partition: the dedupe row, written in the
// same transaction, is what keeps a replay from applying an event twice.
// It does not keep order: the event is applied after the later events of
// its key, which the partition applied while it sat in the dead-letter
// table.
func (i *Inbox) Replay(ctx context.Context, id int64) (applied bool, err error) {
	err = pgx.BeginFunc(ctx, i.db, func(tx pgx.Tx) error {
		var (
			r        kgo.Record
			outboxID *int64
			headers  []byte
			ts       *time.Time
			attempts int
		)
		err := tx.QueryRow(ctx, `SELECT topic, partition, kafka_offset, outbox_id, key, value, headers, record_time, attempts
FROM `+i.t.deadLetter+` WHERE id = $1 FOR UPDATE`, id).
			Scan(&r.Topic, &r.Partition, &r.Offset, &outboxID, &r.Key, &r.Value, &headers, &ts, &attempts)
		if errors.Is(err, pgx.ErrNoRows) {
			return fmt.Errorf("%w: id %d in %s", ErrNoDeadLetter, id, i.t.deadLetter)
		}
		if err != nil {
			return fmt.Errorf("read dead letter %d: %w", id, err)
		}
		if outboxID == nil {
			return fmt.Errorf("%w (dead letter %d, %s partition %d offset %d)", ErrNoDedupeKey, id, r.Topic, r.Partition, r.Offset)
		}
		if ts != nil {
			r.Timestamp = *ts
		}
		if r.Headers, err = parseHeaders(headers); err != nil {
			return fmt.Errorf("dead letter %d: headers: %w", id, err)
		}
		// The dedupe key of the record: its event id when it has one.
		q := `INSERT INTO ` + i.t.applied + ` (topic, outbox_id, consumer_group, partition, kafka_offset)
VALUES ($1, $2, $3, $4, $5) ON CONFLICT (topic, outbox_id) WHERE event_id IS NULL DO NOTHING`
		args := []any{r.Topic, *outboxID, i.cfg.Group, r.Partition, r.Offset}
		if ev := eventIDArg(&r); ev != nil {
			q = `INSERT INTO ` + i.t.applied + ` (topic, outbox_id, consumer_group, partition, kafka_offset, event_id)
VALUES ($1, $2, $3, $4, $5, $6::uuid) ON CONFLICT (topic, event_id) WHERE event_id IS NOT NULL DO NOTHING`
			args = append(args, ev)
		}
		tag, err := tx.Exec(ctx, q, args...)
		if err != nil {
			return fmt.Errorf("record dead letter %d as applied: %w", id, err)
		}
		if tag.RowsAffected() == 1 {
			if err := i.callHandler(ctx, tx, eventOf(&r, *outboxID, attempts+1)); err != nil {
				return fmt.Errorf("replay dead letter %d: handler: %w", id, err)
			}
			applied = true
		}
		if _, err := tx.Exec(ctx, `DELETE FROM `+i.t.deadLetter+` WHERE id = $1`, id); err != nil {
			return fmt.Errorf("delete dead letter %d: %w", id, err)
		}
		return nil
	})
	if err != nil {
		return false, err
	}
	i.log.Info("inbox: dead letter replayed", "id", id, "applied", applied)
	return applied, nil
}

// parseHeaders reverses headersJSON.
func parseHeaders(b []byte) ([]kgo.RecordHeader, error) {
	if len(b) == 0 {
		return nil, nil
	}
	var hs []map[string]string
	if err := json.Unmarshal(b, &hs); err != nil {
		return nil, err
	}
	out := make([]kgo.RecordHeader, len(hs))
	for n, h := range hs {
		out[n].Key = h["key"]
		if v, ok := h["base64"]; ok {
			raw, err := base64.StdEncoding.DecodeString(v)
			if err != nil {
				return nil, err
			}
			out[n].Value = raw
		} else {
			out[n].Value = []byte(h["value"])
		}
	}
	return out, nil
}
