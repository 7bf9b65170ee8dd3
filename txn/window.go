package txn

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
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
	enc      [][]byte // each batch encoded on its own, once
}

// With returns the window with batch added as the newest and the oldest
// batches beyond Limit, or beyond MaxBytes once encoded, dropped; w itself
// is unchanged (the batch joins the window only once its transaction
// committed). Each batch is encoded once, when it joins.
func (w Window) With(batch []Committed) Window {
	enc := encodeBatch(batch)
	keep := max(w.Limit, 1) - 1
	size := len(enc)
	from := len(w.batches)
	for from > 0 && len(w.batches)-from < keep && (w.MaxBytes <= 0 || size+len(w.enc[from-1]) <= w.MaxBytes) {
		from--
		size += len(w.enc[from])
	}
	out := Window{Limit: w.Limit, MaxBytes: w.MaxBytes}
	out.batches = append(append(make([][]Committed, 0, len(w.batches)-from+1), w.batches[from:]...), batch)
	out.enc = append(append(make([][]byte, 0, len(w.enc)-from+1), w.enc[from:]...), enc)
	return out
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

// encodeBatch writes a batch as its row count, then per row the id and the
// creation time in microseconds, each as a signed varint delta from the
// previous row (the first row's from zero): ids and times of consecutive rows
// are close, so a row costs about 4 to 6 bytes.
func encodeBatch(b []Committed) []byte {
	buf := binary.AppendUvarint(nil, uint64(len(b)))
	var prevID, prevAt int64
	for _, r := range b {
		at := r.Created.UnixMicro()
		buf = binary.AppendVarint(buf, r.ID-prevID)
		buf = binary.AppendVarint(buf, at-prevAt)
		prevID, prevAt = r.ID, at
	}
	return buf
}

var errWindowCorrupt = errors.New("recovery window is corrupt")

// decodeWindow reads batches written by encodeBatch, one after the other.
func decodeWindow(buf []byte, limit, maxBytes int) (Window, error) {
	w := Window{Limit: limit, MaxBytes: maxBytes}
	for len(buf) > 0 {
		start := buf
		n, k := binary.Uvarint(buf)
		if k <= 0 || n > uint64(len(buf)) {
			return Window{}, errWindowCorrupt
		}
		buf = buf[k:]
		batch := make([]Committed, 0, n)
		var prevID, prevAt int64
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
		w.enc = append(w.enc, start[:len(start)-len(buf)])
	}
	return w, nil
}

// SetWindow stores w, encoded, in the checkpoint (format version 2).
func (cp *Checkpoint) SetWindow(w Window) {
	cp.Version = CheckpointVersion
	cp.Window = slices.Concat(w.enc...)
}

// RecoveryWindow returns the whole window the checkpoint carries, every
// batch it lists, whatever limit is: what recovery must mark is what the
// writer recorded (I9), not what the recovering instance would have kept. A
// relay with a window of 8 that dies with batch n's mark in flight and batch
// n+1 committed left both in its checkpoint; a standby started with a window
// of 1 that kept only n+1 would publish batch n again. limit and maxBytes
// (the recovering instance's OUTBOX_RECOVERY_WINDOW and byte bound) apply
// from the next batch on: Window.With then drops the recovered batches
// beyond them, once recovery marked them durably. A version 1 checkpoint
// (written before the upgrade) lists ids without fingerprints: its rows
// come back with a zero Created time, and the caller must prove them
// otherwise.
func (cp *Checkpoint) RecoveryWindow(limit, maxBytes int) (Window, error) {
	if cp.Version == 1 {
		rows := make([]Committed, len(cp.IDs))
		for i, id := range cp.IDs {
			rows[i] = Committed{ID: id}
		}
		return Window{Limit: limit, MaxBytes: maxBytes, batches: [][]Committed{rows}}, nil
	}
	w, err := decodeWindow(cp.Window, limit, maxBytes)
	if err != nil {
		return Window{}, fmt.Errorf("decode checkpoint of shard %d: %w", cp.Shard, err)
	}
	return w, nil
}
