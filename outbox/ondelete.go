package outbox

import (
	"context"
	"fmt"
	"slices"
	"time"
)

// OnPublish is what the relay does to a row once it is published
// (OUTBOX_ON_PUBLISH).
//
// Both modes select the same rows (published_at IS NULL), prove a row the
// same way before settling it (the lease, and id AND created_at from the
// checkpoint, I5) and settle only rows not yet settled, so recovery by
// either mode is correct for a checkpoint written by the other: a row the
// other mode already settled matches nothing. That is why the mode is not
// part of the table's Identity: a relay in mark mode and one in delete mode
// on one table duplicate nothing and lose nothing, and a table can be
// switched from one to the other by a rolling restart. What a mix changes is
// what the table shows: a row settled in delete mode is gone, so only
// `outbox-relay verify` with OUTBOX_ON_PUBLISH=delete reads such a table
// without taking those rows for phantoms.
type OnPublish string

const (
	// Mark (the default) sets published_at on a published row and keeps it
	// (OUTBOX_RETENTION deletes it later).
	Mark OnPublish = "mark"
	// Delete deletes a published row instead, in the statement that would
	// have marked it. A delete never touches a row that a relay in mark
	// mode marked published.
	Delete OnPublish = "delete"
)

// ParseOnPublish parses OUTBOX_ON_PUBLISH; empty is Mark.
func ParseOnPublish(s string) (OnPublish, error) {
	switch OnPublish(s) {
	case "", Mark:
		return Mark, nil
	case Delete:
		return Delete, nil
	}
	return "", fmt.Errorf("%q is not an on-publish action: use mark (set published_at and keep the row; the default) or delete (delete the row once published, for tables kept without an audit trail)", s)
}

// WithOnPublish returns a copy of the store that settles published rows as p
// says: every mark (MarkPublished, MarkCommitted, MarkCommittedBefore,
// MarkInflight) deletes the rows instead under Delete, with the same lease
// check and the same proof.
func (s *Store) WithOnPublish(p OnPublish) *Store {
	c := *s
	c.onPublish = p
	return &c
}

// OnPublish is what the store does to a published row.
func (s *Store) OnPublish() OnPublish {
	if s.onPublish == "" {
		return Mark
	}
	return s.onPublish
}

// deleting reports whether marks delete rows.
func (s *Store) deleting() bool { return s.onPublish == Delete }

// deletePublished is MarkPublished under Delete: it deletes the unpublished
// rows with the given ids.
func (s *Store) deletePublished(ctx context.Context, l Lease, ids []int64) (int64, error) {
	return s.underLease(ctx, l, len(ids), "delete %d published rows of shard %d from %s", `DELETE FROM `+s.t.Ident()+`
    WHERE id = ANY($1::bigint[]) AND published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token)
}

// deleteCommitted is MarkCommitted under Delete: it deletes the unpublished
// rows a committed Kafka transaction holds, each only when its id AND its
// creation time match (I5). A row that reuses a recorded id (after a
// restore) has another created_at and is left, to be published; a row
// already deleted matches nothing, so recovery may apply a checkpoint's
// window any number of times.
func (s *Store) deleteCommitted(ctx context.Context, l Lease, ids []int64, created []time.Time) (int64, error) {
	return s.underLease(ctx, l, len(ids), "delete %d published rows of shard %d from %s", `DELETE FROM `+s.t.Ident()+` o
    USING unnest($1::bigint[], $4::timestamptz[]) AS c(id, created)
    WHERE o.id = c.id AND o.created_at = c.created AND o.published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token, created)
}

// deleteCommittedBefore is MarkCommittedBefore under Delete: checkpoints of
// format version 1 carry ids without fingerprints, so a row is deleted only
// when it was created no later than the checkpoint was written.
func (s *Store) deleteCommittedBefore(ctx context.Context, l Lease, ids []int64, written time.Time) (int64, error) {
	return s.underLease(ctx, l, len(ids), "delete %d published rows of shard %d from %s", `DELETE FROM `+s.t.Ident()+`
    WHERE id = ANY($1::bigint[]) AND created_at <= $4 AND published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token, written)
}

// deleteInflight is MarkInflight under Delete: in one statement it deletes
// the unpublished rows with the given ids and records the ones it deleted
// as an in-flight batch of the shard, before the batch is produced. Only
// the rows it deleted are to be sent (the caller holds their content): a row
// another relay deleted, or marked, is not.
func (s *Store) deleteInflight(ctx context.Context, l Lease, ids []int64) (deleted []int64, batch int64, err error) {
	var held bool
	var b *int64
	err = s.pool.QueryRow(ctx, `WITH `+s.leaseCTE(2, 3)+`, deleted AS (
    DELETE FROM `+s.t.Ident()+`
    WHERE id = ANY($1::bigint[]) AND published_at IS NULL AND EXISTS (SELECT FROM lease)
    RETURNING id
), recorded AS (
    INSERT INTO `+s.t.InflightIdent()+` (shard, ids)
    SELECT $2, (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM deleted)
    WHERE EXISTS (SELECT FROM lease)
    RETURNING batch, ids
)
SELECT EXISTS (SELECT FROM lease), (SELECT batch FROM recorded), coalesce((SELECT ids FROM recorded), '{}')`,
		ids, l.Shard, l.Token).Scan(&held, &b, &deleted)
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return nil, 0, fmt.Errorf("delete %d rows of shard %d before sending (at-most-once) from %s: %w", len(ids), l.Shard, s.t, err)
	}
	slices.Sort(deleted)
	return deleted, *b, nil
}
