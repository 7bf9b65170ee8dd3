package txn

import (
	"encoding/binary"
	"errors"
	"fmt"
	"time"
)

// Committed is one row a committed transaction of the shard holds, with the
// fingerprint that proves which row it was: its creation time. An id alone
// proves nothing after a point-in-time restore, a TRUNCATE ... RESTART
// IDENTITY or a fail-over that lost the sequence's latest WAL, because new
// rows then reuse the id; a new row never has the creation time, to the
// microsecond, of the row it replaced.
type Committed struct {
	ID      int64
	Created time.Time
}

// Window is the recovery window of a shard: the rows of its most recent
// committed batches, newest last. Every checkpoint carries it (I2 and I5 of
// DESIGN.md), so recovery re-applies the marks of the last Limit batches, not
// only the last one: marks lost in a database crash or in a fail-over to an
// asynchronous standby republish nothing as long as no more than Limit
// batches lost them.
type Window struct {
	// Limit is the most batches kept (OUTBOX_RECOVERY_WINDOW).
	Limit int
	// MaxBytes bounds the encoded window, so that the checkpoint record
	// always fits the producer's batch.size: the oldest batches are
	// dropped first; the newest batch is always kept.
	MaxBytes int
	batches  [][]Committed
}

// With returns the window with batch added as the newest and the oldest
// batches beyond Limit dropped; w itself is unchanged (the batch joins the
// window only once its transaction committed).
func (w Window) With(batch []Committed) Window {
	keep := w.batches[max(0, len(w.batches)+1-max(w.Limit, 1)):]
	w.batches = append(append(make([][]Committed, 0, len(keep)+1), keep...), batch)
	return w
}

// Rows returns every row of the window, oldest batch first.
func (w *Window) Rows() []Committed {
	var out []Committed
	for _, b := range w.batches {
		out = append(out, b...)
	}
	return out
}

// Batches is the number of batches in the window.
func (w *Window) Batches() int { return len(w.batches) }

// encode writes the window as: for each batch, the row count, then per row
// the id and the creation time in microseconds, each as a signed varint
// delta from the previous row (ids and times of consecutive rows are close,
// so a row costs about 4 bytes). Oldest batches are left out while the
// result exceeds MaxBytes; the newest batch always stays.
func (w *Window) encode() []byte {
	for from := 0; ; from++ {
		buf := encodeBatches(w.batches[from:])
		if w.MaxBytes <= 0 || len(buf) <= w.MaxBytes || from == len(w.batches)-1 {
			if from > 0 {
				w.batches = append(w.batches[:0:0], w.batches[from:]...)
			}
			return buf
		}
	}
}

func encodeBatches(batches [][]Committed) []byte {
	var buf []byte
	var prevID, prevAt int64
	for _, b := range batches {
		buf = binary.AppendUvarint(buf, uint64(len(b)))
		for _, r := range b {
			at := r.Created.UnixMicro()
			buf = binary.AppendVarint(buf, r.ID-prevID)
			buf = binary.AppendVarint(buf, at-prevAt)
			prevID, prevAt = r.ID, at
		}
	}
	return buf
}

var errWindowCorrupt = errors.New("recovery window is corrupt")

// decodeWindow reads what encode wrote.
func decodeWindow(buf []byte, limit int) (Window, error) {
	w := Window{Limit: limit}
	var prevID, prevAt int64
	for len(buf) > 0 {
		n, k := binary.Uvarint(buf)
		if k <= 0 || n > uint64(len(buf)) {
			return Window{}, errWindowCorrupt
		}
		buf = buf[k:]
		batch := make([]Committed, 0, n)
		for range n {
			dID, k1 := binary.Varint(buf)
			if k1 <= 0 {
				return Window{}, errWindowCorrupt
			}
			dAt, k2 := binary.Varint(buf[k1:])
			if k2 <= 0 {
				return Window{}, errWindowCorrupt
			}
			buf = buf[k1+k2:]
			prevID, prevAt = prevID+dID, prevAt+dAt
			batch = append(batch, Committed{ID: prevID, Created: time.UnixMicro(prevAt).UTC()})
		}
		w.batches = append(w.batches, batch)
	}
	return w, nil
}

// SetWindow stores w, encoded, in the checkpoint (format version 2).
func (cp *Checkpoint) SetWindow(w *Window) {
	cp.Version = CheckpointVersion
	cp.Window = w.encode()
}

// RecoveryWindow returns the window the checkpoint carries, with at most
// limit batches kept from here on. A version 1 checkpoint (written before the
// upgrade) lists ids without fingerprints: its rows come back with a zero
// Created time, and the caller must prove them otherwise.
func (cp *Checkpoint) RecoveryWindow(limit int) (Window, error) {
	if cp.Version == 1 {
		rows := make([]Committed, len(cp.IDs))
		for i, id := range cp.IDs {
			rows[i] = Committed{ID: id}
		}
		w := Window{Limit: limit}
		if len(rows) > 0 {
			w = w.With(rows)
		}
		return w, nil
	}
	w, err := decodeWindow(cp.Window, limit)
	if err != nil {
		return Window{}, fmt.Errorf("decode checkpoint of shard %d: %w", cp.Shard, err)
	}
	if over := len(w.batches) - max(limit, 1); over > 0 {
		w.batches = w.batches[over:]
	}
	return w, nil
}
