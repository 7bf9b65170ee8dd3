package outbox

import (
	"context"
	"crypto/md5"
	"encoding/hex"
	"errors"
	"fmt"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgtype"
	"github.com/jackc/pgx/v5/pgxpool"
)

// Row is one outbox row as the relay reads it.
type Row struct {
	ID        int64
	Topic     string
	Key       []byte
	Value     []byte // nil: a tombstone
	Headers   []byte // the jsonb text, nil when NULL
	Partition *int32
	CreatedAt time.Time
	// Oversize is set, and Value and Headers are nil, when the row's key,
	// value and headers add up to more than the store's record limit
	// (WithRecordMaxBytes): such a row can never be a Kafka record, and the
	// read does not bring its value into the relay, whatever its size.
	// Key is still read when it is within the limit on its own.
	Oversize *Oversize
	// EventID is the event_id column as text, "" for a row written before
	// migration 7 (NULL): the relay then sends no outbox-event-id header.
	EventID string
}

// Oversize is what the read tells of a row larger than the record limit:
// the sizes of its columns, and the MD5 of its key when the key alone is
// larger than the limit (Key is then nil), so that the row's key can still
// be told from others (hold-key) without reading it.
type Oversize struct {
	Key, Value, Headers int64 // bytes; headers as JSON text
	Limit               int64 // the record limit it passes
	KeyDigest           []byte
}

// Total is the row's key, value and headers in bytes.
func (o *Oversize) Total() int64 { return o.Key + o.Value + o.Headers }

// Store runs the relay's queries on one outbox table.
type Store struct {
	pool  *pgxpool.Pool
	t     Table
	order DeadLetterOrder
	// onPublish: Delete makes every mark a delete (WithOnPublish).
	onPublish OnPublish
	// recordMax: rows larger than this come without their value
	// (WithRecordMaxBytes); 0 is no limit.
	recordMax int64
}

// WithRecordMaxBytes returns a copy of the store whose reads bring no row
// whose key, value and headers (as JSON text) add up to more than n bytes:
// such a row comes with Row.Oversize set instead of its value and headers
// (and of its key, if the key alone passes n), so that a row that can never
// be published (n is the producer's largest record) is dead-lettered by its
// size without its value ever being in the relay's memory. 0 (the default)
// is no limit.
func (s *Store) WithRecordMaxBytes(n int64) *Store {
	c := *s
	c.recordMax = max(n, 0)
	return &c
}

// DeadLetterOrder is what a dead letter does to the later rows of its key
// (OUTBOX_DEAD_LETTER_ORDER).
type DeadLetterOrder string

const (
	// HoldKey (the default): while a row is in the dead-letter table and
	// not discarded, the later rows of its topic and key are not read, so
	// a key's records reach Kafka in id order or not at all. Keyless rows
	// are never held.
	HoldKey DeadLetterOrder = "hold-key"
	// Skip: a dead letter holds nothing; the later rows of its key are
	// published without it.
	Skip DeadLetterOrder = "skip"
)

// ParseDeadLetterOrder parses OUTBOX_DEAD_LETTER_ORDER; empty is HoldKey.
func ParseDeadLetterOrder(s string) (DeadLetterOrder, error) {
	switch DeadLetterOrder(s) {
	case "", HoldKey:
		return HoldKey, nil
	case Skip:
		return Skip, nil
	}
	return "", fmt.Errorf("%q is not a dead-letter order: use hold-key (a dead letter holds the later rows of its key until requeued or discarded) or skip (later rows are published without it)", s)
}

// NewStore returns the relay's view of table t, holding the keys of dead
// letters (HoldKey).
func NewStore(pool *pgxpool.Pool, t Table) *Store { return &Store{pool: pool, t: t, order: HoldKey} }

// WithDeadLetterOrder returns a copy of the store that reads with order o.
func (s *Store) WithDeadLetterOrder(o DeadLetterOrder) *Store {
	c := *s
	c.order = o
	return &c
}

// heldFilter is the condition, on outbox rows aliased o, of rows held by a
// dead letter: a dead letter of the same topic and key with a lower id that
// is not discarded. A NULL key equals nothing, so keyless rows are never
// held. The probe is a lookup in <table>_dead_letter_held_digest, on the
// MD5 of topic and key (a key or topic of any length has a bounded index
// entry); the topic and key themselves are then compared on the dead
// letters found, so a collision holds nothing.
func (s *Store) heldFilter() string {
	return `EXISTS (SELECT FROM ` + s.t.DeadLetterIdent() + ` d WHERE md5(d.topic) = md5(o.topic) AND md5(d.key) = md5(o.key) AND d.id < o.id` +
		` AND d.discarded_at IS NULL AND d.key IS NOT NULL AND d.topic = o.topic AND d.key = o.key)`
}

// Table is the table the store reads.
func (s *Store) Table() Table { return s.t }

// WakeChannel is the LISTEN channel the insert trigger notifies:
// "outbox_" followed by the MD5 of "<schema>.<table>" (unquoted).
func (t Table) WakeChannel() string {
	sum := md5.Sum([]byte(t.Schema + "." + t.Name))
	return "outbox_" + hex.EncodeToString(sum[:])
}

// shardFilter restricts a query to the rows of one shard when there are
// several: rows map to shards by a hash of their key, keyless rows by id.
// I4: every row of one key lands in the same shard. The shard count is
// written into the statement as a literal (an int, never user text), so
// that the expression is the one the shard index is built on
// (ShardIndexSQL) and the planner can use that index, also in a generic
// plan; the shard is parameter $argN.
func shardFilter(shard, shards int, argN int) (string, []any) {
	if shards <= 1 {
		return "", nil
	}
	return ` AND ` + shardExpr(shards) + ` = $` + strconv.Itoa(argN), []any{int64(shard)}
}

// ReadBatch returns unpublished rows of one shard in id order, without the
// rows held by a dead letter of their key (HoldKey): at most limit
// rows, and, when maxBytes > 0, no more than maxBytes of key, value and
// headers (as JSON text) in all, but always at least the first row, so that a
// single row larger than maxBytes is still read, on its own.
//
// It is one query when no row is larger than maxBytes/limit: every row comes
// with its size (octet_length of its columns, which PostgreSQL reads from a
// stored value's header without fetching, detoasting, it), the relay cuts
// in id order at maxBytes, and the rows past the cut are dropped as they
// arrive, never held. A larger row comes with its size alone, and its
// columns are read by a second query only if it is kept, so that what the
// server sends stays about maxBytes, wherever the cut falls.
func (s *Store) ReadBatch(ctx context.Context, shard, shards, limit int, maxBytes int64) ([]Row, error) {
	return s.read(ctx, nil, shard, shards, limit, maxBytes, nil)
}

// read runs ReadBatchSQL, without the rows whose ids are in skip; with a
// lease, wrapped by durableRead.
func (s *Store) read(ctx context.Context, l *Lease, shard, shards, limit int, maxBytes int64, skip []int64) ([]Row, error) {
	args := []any{limit}
	var bound byteBound
	switch {
	case maxBytes > 0:
		bound = byteBound{max: maxBytes, inline: max(1, maxBytes/int64(max(limit, 1)))}
	case s.recordMax > 0:
		bound = byteBound{max: math.MaxInt64, inline: s.recordMax}
	}
	if s.recordMax > 0 {
		// A row larger than the record limit must not come with its
		// columns: it is dead-lettered by its size (readOversize).
		bound.inline = min(bound.inline, s.recordMax)
	}
	if bound.max > 0 {
		args = append(args, bound.inline)
	}
	_, fargs := shardFilter(shard, shards, 0)
	args = append(args, fargs...)
	skipArg := 0
	if len(skip) > 0 {
		args = append(args, skip)
		skipArg = len(args)
	}
	q := s.readSQL(shards, bound.max > 0, skipArg)
	if l != nil {
		q = s.durableRead(q, len(args)+1)
		args = append(args, l.Shard, l.Token)
	}
	fail := func(err error) ([]Row, error) {
		return nil, fmt.Errorf("read unpublished rows of shard %d of %s: %w", shard, s.t, err)
	}
	rows, err := s.pool.Query(ctx, q, args...)
	if err != nil {
		return fail(err)
	}
	defer rows.Close()
	var (
		out     []Row
		total   int64
		outside []int // rows of out whose columns are read apart (readOutside)
		over    []int // rows of out larger than the record limit (readOversize)
		ok      = true
		// One set of destinations for every row, and one string per
		// topic: a row costs the allocations of its key, value and
		// headers, not of its struct, its topic and the scan's list.
		row     Row
		topic   pgtype.DriverBytes
		topics  = map[string]string{}
		size    int64
		durable bool
		eventID pgtype.Text
		dest    = []any{&row.ID, &topic, &row.Key, &row.Value, &row.Headers, &row.Partition, &row.CreatedAt, &eventID}
	)
	if bound.max > 0 {
		dest = append(dest, &size)
	}
	if l != nil {
		dest = append(dest, &durable)
	}
	if len(skip) > 0 {
		// Rows in flight are left out only after a full batch, so this
		// read is likely full too: room for all of it at once (appending
		// row by row grew the array ten times, half of a full read's
		// garbage). A read that may find a few rows starts small.
		out = make([]Row, 0, min(limit, 1<<14))
	}
	for rows.Next() {
		row = Row{}
		if err := rows.Scan(dest...); err != nil {
			return fail(err)
		}
		if l != nil && !durable {
			ok = false
		}
		if bound.max > 0 {
			// The cut: rows in id order while their bytes stay within the
			// bound, and always the first. The rows past it are not kept
			// (Close reads and drops them: each at most bound.inline
			// bytes, as larger ones come without their columns).
			if s.recordMax > 0 && size > s.recordMax {
				// Dead-lettered by its size: none of its bytes are
				// brought, so it takes none of the bound.
				over = append(over, len(out))
			} else {
				if len(out) > 0 && total+size > bound.max {
					break
				}
				total += size
				if size > bound.inline {
					outside = append(outside, len(out))
				}
			}
		}
		t, seen := topics[string(topic)]
		if !seen {
			t = string(topic)
			topics[t] = t
		}
		row.Topic = t
		row.EventID = eventID.String // "" when NULL
		out = append(out, row)
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return fail(err)
	}
	if !ok {
		return fail(ErrLeaseLost)
	}
	if err := s.readOutside(ctx, out, outside); err != nil {
		return fail(err)
	}
	if err := s.readOversize(ctx, out, over); err != nil {
		return fail(err)
	}
	return out, nil
}

// readOversize sets Oversize on the rows of out at the indexes in which,
// larger than the record limit, which the read sent without their columns:
// the sizes of key, value and headers, and the key if it is within the
// limit on its own, else its MD5. The value is never read. Like
// readOutside, a row gone or changed since the read fails it.
func (s *Store) readOversize(ctx context.Context, out []Row, which []int) error {
	if len(which) == 0 {
		return nil
	}
	ids := make([]int64, len(which))
	at := make(map[int64]int, len(which))
	for i, w := range which {
		ids[i] = out[w].ID
		at[out[w].ID] = w
	}
	rows, err := s.pool.Query(ctx, `SELECT id, created_at, coalesce(octet_length(key), 0)::bigint, coalesce(octet_length(value), 0)::bigint,
    coalesce(octet_length(headers::text), 0)::bigint, CASE WHEN octet_length(key) <= $2 THEN key END,
    CASE WHEN octet_length(key) > $2 THEN decode(md5(key), 'hex') END
FROM `+s.t.Ident()+` WHERE id = ANY($1::bigint[])`, ids, s.recordMax)
	if err != nil {
		return fmt.Errorf("read the sizes of %d rows larger than a record: %w", len(ids), err)
	}
	found := 0
	var (
		id      int64
		created time.Time
		o       Oversize
		key     []byte
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &created, &o.Key, &o.Value, &o.Headers, &key, &o.KeyDigest}, func() error {
		w, ok := at[id]
		if !ok || !out[w].CreatedAt.Equal(created) {
			return nil
		}
		found++
		over := o
		over.Limit = s.recordMax
		out[w].Key, out[w].Value, out[w].Headers, out[w].Oversize = key, nil, nil, &over
		return nil
	})
	if err != nil {
		return fmt.Errorf("read the sizes of %d rows larger than a record: %w", len(ids), err)
	}
	if found != len(ids) {
		return fmt.Errorf("read the sizes of %d rows larger than a record: %d of them are gone or changed since the read", len(ids), len(ids)-found)
	}
	return nil
}

// byteBound is a read's bound in bytes (OUTBOX_BATCH_MAX_BYTES): max in
// all, and inline, the most a row may have to come with its key, value and
// headers in the read itself (max divided by the row limit, so that the
// rows a read sends add up to about max at most, wherever it cuts).
type byteBound struct{ max, inline int64 }

// readOutside reads the key, value and headers of the rows of out at the
// indexes in which, which the read sent without them (larger than the
// bound's inline part). Rows are immutable once written; one that is gone,
// or is another row now (another created_at), fails the read, which the
// relay then starts again.
func (s *Store) readOutside(ctx context.Context, out []Row, which []int) error {
	if len(which) == 0 {
		return nil
	}
	ids := make([]int64, len(which))
	at := make(map[int64]int, len(which))
	for i, w := range which {
		ids[i] = out[w].ID
		at[out[w].ID] = w
	}
	rows, err := s.pool.Query(ctx, `SELECT id, created_at, key, value, headers::text FROM `+s.t.Ident()+` WHERE id = ANY($1::bigint[])`, ids)
	if err != nil {
		return fmt.Errorf("read the columns of %d large rows: %w", len(ids), err)
	}
	found := 0
	var (
		id      int64
		created time.Time
		key     []byte
		value   []byte
		headers *string
	)
	_, err = pgx.ForEachRow(rows, []any{&id, &created, &key, &value, &headers}, func() error {
		w, ok := at[id]
		if !ok || !out[w].CreatedAt.Equal(created) {
			return nil
		}
		found++
		out[w].Key, out[w].Value, out[w].Headers = key, value, nil
		if headers != nil {
			out[w].Headers = []byte(*headers)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("read the columns of %d large rows: %w", len(ids), err)
	}
	if found != len(ids) {
		return fmt.Errorf("read the columns of %d large rows: %d of them are gone or changed since the read", len(ids), len(ids)-found)
	}
	return nil
}

// ReadBatchSQL is the statement ReadBatch runs on a table of shards
// shards, with a byte bound (bounded) or without: $1 is the row limit, $2 if
// bounded the most bytes a row may have to come with its key, value and
// headers (larger rows come with their size only), and the next one the
// shard if shards > 1. It is here to be EXPLAINed.
func (s *Store) ReadBatchSQL(shards int, bounded bool) string { return s.readSQL(shards, bounded, 0) }

// ReadSkippingSQL is ReadBatchSQL that also leaves out the ids of the
// bigint[] parameter after the others (see ReadDurable), without the
// durable wrapper. It is here to be EXPLAINed.
func (s *Store) ReadSkippingSQL(shards int, bounded bool) string {
	n := 2
	if bounded {
		n++
	}
	if shards > 1 {
		n++
	}
	return s.readSQL(shards, bounded, n)
}

// readSQL is ReadBatchSQL, also leaving out the rows whose ids are in the
// bigint[] parameter $skipArg when skipArg > 0 (the ids of the batches in
// flight, see ReadDurable). NOT IN over the unnested array is a
// hashed subplan, built once a read, in the generic plan a prepared
// statement gets after five runs too: there, `id <> ALL ($n)` compares each
// row with the whole array (15 ms a read of 1,000 rows past 2,000 ids in
// flight, 380 ms at 5,000 past 10,000, against 1 and 6 ms), and an
// anti-join with the unnested array sorts it and merges.
func (s *Store) readSQL(shards int, bounded bool, skipArg int) string {
	hold := ""
	if s.order != Skip {
		hold = ` AND NOT ` + s.heldFilter()
	}
	if skipArg > 0 {
		hold += ` AND o.id NOT IN (SELECT unnest($` + strconv.Itoa(skipArg) + `::bigint[]))`
	}
	if !bounded {
		filter, _ := shardFilter(0, shards, 2)
		return `SELECT id, topic, key, value, headers::text, partition, created_at, event_id::text FROM ` + s.t.Ident() +
			` o WHERE published_at IS NULL` + filter + hold + ` ORDER BY id LIMIT $1`
	}
	filter, _ := shardFilter(0, shards, 3)
	// Bounded: every row comes with its size in bytes (key, value and
	// headers as JSON text; octet_length reads a stored value's size from
	// its header, without fetching a TOASTed value), and with its key,
	// value and headers only if that size is at most $2, the bound's inline
	// part; read cuts the rows in order at the bound and reads the columns
	// of the larger rows it keeps apart (readOutside). One walk of the
	// index, no window over the rows: a running sum in SQL cost 0.7 ms of
	// server time for 1,000 rows of 200 bytes, where the read without it
	// took 0.2 ms.
	// A topic of more than MaxTopicRead bytes (never a Kafka topic, which
	// has at most 249 characters) comes as its first MaxTopicRead+1
	// characters: the relay refuses it by its length, and a row cannot
	// bring megabytes in its topic either.
	return `SELECT id, CASE WHEN octet_length(topic) <= ` + strconv.Itoa(MaxTopicRead) + ` THEN topic ELSE left(topic, ` + strconv.Itoa(MaxTopicRead+1) + `) END,
    CASE WHEN size <= $2 THEN key END, CASE WHEN size <= $2 THEN value END,
    CASE WHEN size <= $2 THEN headers END, partition, created_at, event_id, size
FROM (SELECT id, topic, key, value, headers::text AS headers, partition, created_at, event_id::text AS event_id FROM ` + s.t.Ident() +
		` o WHERE published_at IS NULL` + filter + hold + ` ORDER BY id LIMIT $1) AS c,
    LATERAL (SELECT coalesce(octet_length(c.key), 0)::bigint + coalesce(octet_length(c.value), 0) + coalesce(octet_length(c.headers), 0) AS size) AS z
ORDER BY id`
}

// MaxTopicRead bounds the topic a read with a byte bound brings: a topic of
// more bytes comes as its first MaxTopicRead+1 characters, so a Row.Topic
// of more than MaxTopicRead characters is one cut short.
const MaxTopicRead = 1024

// Lease is a relay's hold on one shard: the fencing token it got when it
// took the shard (TakeLease). Every statement by which a relay changes rows
// of the shard carries it and changes nothing once another relay has taken
// the shard (a newer token): the PostgreSQL side of fencing, as the
// transactional id is on the Kafka side.
type Lease struct {
	Shard int32
	Token int64
}

// ErrLeaseLost: the statement changed nothing because the caller's lease on
// the shard is no longer current: another relay took the shard over. The
// caller no longer owns the shard and must stop working on it.
var ErrLeaseLost = errors.New("shard lease lost: another relay took the shard over")

// Querier is the part of pgx the ownership statements need; *pgx.Conn,
// pgx.Tx and *pgxpool.Pool all fit.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// TakeLease records owner as the owner of shard and returns its new lease,
// with a token one higher than any earlier owner's. Call it only while
// holding the shard's advisory lock, before recovery reads or marks
// anything. It waits for every statement that still runs under an older
// lease of the shard (they hold the owner row FOR SHARE); once it returns,
// no such statement can change a row.
func (s *Store) TakeLease(ctx context.Context, q Querier, shard int32, owner string) (Lease, error) {
	l := Lease{Shard: shard}
	err := q.QueryRow(ctx, `INSERT INTO `+s.t.OwnerIdent()+` AS o (shard, token, owner) VALUES ($1, 1, $2)
ON CONFLICT (shard) DO UPDATE SET token = o.token + 1, owner = excluded.owner, taken_at = now(), renewed_at = now(),
    stopped_at = NULL, stopped_reason = NULL
RETURNING token`, shard, owner).Scan(&l.Token)
	if err != nil {
		return Lease{}, fmt.Errorf("take lease of shard %d of %s: %w", shard, s.t, err)
	}
	return l, nil
}

// maxStoppedReason bounds the reason RecordStopped keeps, in bytes.
const maxStoppedReason = 4000

// RecordStopped records, in the shard's row of <table>_owner, that the owner
// holding lease l stopped the shard until an operator acts, and why, so
// that `outbox-relay status` shows it from any host. The next TakeLease of
// the shard clears it. It changes nothing, and returns ErrLeaseLost, when l
// is no longer current.
func (s *Store) RecordStopped(ctx context.Context, q Querier, l Lease, reason string) error {
	if len(reason) > maxStoppedReason {
		cut := maxStoppedReason
		for cut > 0 && !utf8.RuneStart(reason[cut]) {
			cut--
		}
		reason = reason[:cut] + "..."
	}
	var n int
	err := q.QueryRow(ctx, `WITH stopped AS (
    UPDATE `+s.t.OwnerIdent()+` SET stopped_at = now(), stopped_reason = $3 WHERE shard = $1 AND token = $2 RETURNING 1
) SELECT count(*) FROM stopped`, l.Shard, l.Token, reason).Scan(&n)
	if err != nil {
		return fmt.Errorf("record shard %d of %s stopped: %w", l.Shard, s.t, err)
	}
	if n == 0 {
		return fmt.Errorf("record shard %d of %s stopped: %w", l.Shard, s.t, ErrLeaseLost)
	}
	return nil
}

// RenewLeases sets renewed_at to now (the database clock) for every lease
// that is still current, and returns the shards of those that are not (lost
// to another relay). It never waits: a lease whose row a statement of its
// shard holds at this moment is renewed on the next call.
func (s *Store) RenewLeases(ctx context.Context, q Querier, leases []Lease) (lost []int32, err error) {
	if len(leases) == 0 {
		return nil, nil
	}
	shards := make([]int32, len(leases))
	tokens := make([]int64, len(leases))
	for i, l := range leases {
		shards[i], tokens[i] = l.Shard, l.Token
	}
	rows, err := q.Query(ctx, `WITH l AS (
    SELECT * FROM unnest($1::int[], $2::bigint[]) AS l(shard, token)
), free AS (
    SELECT o.shard FROM `+s.t.OwnerIdent()+` o JOIN l ON o.shard = l.shard AND o.token = l.token
    FOR NO KEY UPDATE OF o SKIP LOCKED
), renewed AS (
    UPDATE `+s.t.OwnerIdent()+` o SET renewed_at = now() FROM free WHERE o.shard = free.shard
    RETURNING o.shard
)
SELECT l.shard FROM l LEFT JOIN `+s.t.OwnerIdent()+` o ON o.shard = l.shard WHERE o.token IS DISTINCT FROM l.token`, shards, tokens)
	if err != nil {
		return nil, fmt.Errorf("renew %d shard leases of %s: %w", len(leases), s.t, err)
	}
	if lost, err = pgx.CollectRows(rows, pgx.RowTo[int32]); err != nil {
		return nil, fmt.Errorf("renew %d shard leases of %s: %w", len(leases), s.t, err)
	}
	return lost, nil
}

// leaseHeld is the condition, in a statement that changes rows of a shard
// (a mark, a delete), that the lease given by parameters $shardArg and
// $tokenArg is current; it holds the shard's owner row FOR SHARE if, and
// only if, it is. A takeover (an UPDATE of that row) therefore either waits
// for the statement to commit, or commits first, and then the statement
// sees no current lease and changes nothing.
func (s *Store) leaseHeld(shardArg, tokenArg int) string {
	return `EXISTS (` + s.leaseRow(shardArg, tokenArg) + ` FOR SHARE)`
}

// leaseRow selects the shard's owner row if the lease given by parameters
// $shardArg and $tokenArg is current.
func (s *Store) leaseRow(shardArg, tokenArg int) string {
	return `SELECT FROM ` + s.t.OwnerIdent() + ` WHERE shard = $` + strconv.Itoa(shardArg) + ` AND token = $` + strconv.Itoa(tokenArg)
}

// leaseCTE is leaseHeld as the first part of a statement that must also
// report the lease (the at-most-once in-flight record, dead letters):
// statements refer to it as "lease" and report EXISTS (SELECT FROM lease),
// so that the caller can tell a lost lease from rows that needed no change.
func (s *Store) leaseCTE(shardArg, tokenArg int) string {
	return `lease AS (` + s.leaseRow(shardArg, tokenArg) + ` FOR SHARE)`
}

// MarkPublished sets published_at on the rows whose ids are given and that
// are not yet marked, and returns how many it marked. It is idempotent, so
// recovery can apply a checkpoint any number of times. It changes nothing and
// returns ErrLeaseLost when l is no longer the shard's current lease. Under
// Delete (WithOnPublish) it deletes the rows instead.
func (s *Store) MarkPublished(ctx context.Context, l Lease, ids []int64) (int64, error) {
	if s.deleting() {
		return s.deletePublished(ctx, l, ids)
	}
	return s.underLease(ctx, l, len(ids), markWhat, `UPDATE `+s.t.Ident()+` SET published_at = now()
    WHERE id = ANY($1::bigint[]) AND published_at IS NULL AND `+s.leaseHeld(2, 3), ids, l.Shard, l.Token)
}

// MarkInflight is at-most-once's mark: in one statement it marks ids
// published and records the ones it marked as an in-flight batch of the
// shard, before the batch is produced. It returns the ids it marked (rows
// already marked, by another relay that still thinks it owns the shard, are
// not) and the in-flight batch to confirm once sent. Every batch is a row of
// its own, so a batch an old owner marked and never sent is still there after
// a new owner confirmed its own. It changes nothing and returns ErrLeaseLost
// when l is no longer the shard's current lease. (One statement, not a
// transaction of several: a relay frozen between two of them would hold the
// owner row and block the takeover.) Under Delete (WithOnPublish) it deletes
// the rows instead, and returns the ids it deleted.
func (s *Store) MarkInflight(ctx context.Context, l Lease, ids []int64) (marked []int64, batch int64, err error) {
	if s.deleting() {
		return s.deleteInflight(ctx, l, ids)
	}
	var held bool
	var b *int64
	err = s.pool.QueryRow(ctx, `WITH `+s.leaseCTE(2, 3)+`, marked AS (
    UPDATE `+s.t.Ident()+` SET published_at = now()
    WHERE id = ANY($1::bigint[]) AND published_at IS NULL AND EXISTS (SELECT FROM lease)
    RETURNING id
), recorded AS (
    INSERT INTO `+s.t.InflightIdent()+` (shard, ids)
    SELECT $2, (SELECT coalesce(array_agg(id ORDER BY id), '{}') FROM marked)
    WHERE EXISTS (SELECT FROM lease)
    RETURNING batch, ids
)
SELECT EXISTS (SELECT FROM lease), (SELECT batch FROM recorded), coalesce((SELECT ids FROM recorded), '{}')`,
		ids, l.Shard, l.Token).Scan(&held, &b, &marked)
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return nil, 0, fmt.Errorf("mark %d rows of shard %d published before sending (at-most-once) in %s: %w", len(ids), l.Shard, s.t, err)
	}
	slices.Sort(marked)
	return marked, *b, nil
}

// ConfirmInflight removes the in-flight record of a batch whose send has
// ended (sent, or its loss reported). It returns ErrLeaseLost, and leaves
// the record for the new owner to report, when l is no longer current.
func (s *Store) ConfirmInflight(ctx context.Context, l Lease, batch int64) error {
	var held bool
	err := s.pool.QueryRow(ctx, `WITH `+s.leaseCTE(2, 3)+`, confirmed AS (
    DELETE FROM `+s.t.InflightIdent()+` WHERE batch = $1 AND EXISTS (SELECT FROM lease) RETURNING 1
)
SELECT EXISTS (SELECT FROM lease), (SELECT count(*) FROM confirmed)`, batch, l.Shard, l.Token).Scan(&held, new(int64))
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return fmt.Errorf("confirm in-flight batch %d of shard %d of %s: %w", batch, l.Shard, s.t, err)
	}
	return nil
}

// TakeInflight removes and returns the ids of every in-flight at-most-once
// batch of the shard, in id order: rows marked published whose send was
// never confirmed (recovery reports them lost). It returns ErrLeaseLost when
// l is no longer current.
func (s *Store) TakeInflight(ctx context.Context, l Lease) ([]int64, error) {
	var held bool
	var ids []int64
	err := s.pool.QueryRow(ctx, `WITH `+s.leaseCTE(1, 2)+`, taken AS (
    DELETE FROM `+s.t.InflightIdent()+` WHERE shard = $1 AND EXISTS (SELECT FROM lease) RETURNING ids
)
SELECT EXISTS (SELECT FROM lease), coalesce((SELECT array_agg(id ORDER BY id) FROM taken, unnest(taken.ids) AS id), '{}')`,
		l.Shard, l.Token).Scan(&held, &ids)
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return nil, fmt.Errorf("read in-flight batches of shard %d of %s: %w", l.Shard, s.t, err)
	}
	return ids, nil
}

// DeadLetter is a row that cannot be published and the reason.
type DeadLetter struct {
	ID    int64
	Error string
}

// MoveToDeadLetter moves unpublished rows of the shard of l to the
// dead-letter table with their errors, in one statement: a row leaves the
// outbox only as it enters the dead-letter table, so none is lost. Rows
// already published or already moved are left alone. It returns how many
// rows it moved. It moves nothing and returns ErrLeaseLost when l is no
// longer current: a relay that lost the shard must not move a row the new
// owner may have published (`dlq requeue` would publish it twice).
func (s *Store) MoveToDeadLetter(ctx context.Context, l Lease, dead []DeadLetter) (int64, error) {
	if len(dead) == 0 {
		return 0, nil
	}
	ids := make([]int64, len(dead))
	errs := make([]string, len(dead))
	for i, d := range dead {
		ids[i], errs[i] = d.ID, d.Error
	}
	q := `WITH ` + s.leaseCTE(3, 4) + `, bad AS (
    SELECT * FROM unnest($1::bigint[], $2::text[]) AS b(id, error)
), moved AS (
    DELETE FROM ` + s.t.Ident() + ` o USING bad
    WHERE o.id = bad.id AND o.published_at IS NULL AND EXISTS (SELECT FROM lease)
    RETURNING o.id, o.topic, o.key, o.value, o.headers, o.partition, o.created_at, bad.error, o.event_id
), inserted AS (
    INSERT INTO ` + s.t.DeadLetterIdent() + ` (id, topic, key, value, headers, partition, created_at, error, event_id)
    SELECT * FROM moved
    RETURNING 1
)
SELECT EXISTS (SELECT FROM lease), (SELECT count(*) FROM inserted)`
	var held bool
	var n int64
	err := s.pool.QueryRow(ctx, q, ids, errs, l.Shard, l.Token).Scan(&held, &n)
	if err == nil && !held {
		err = ErrLeaseLost
	}
	if err != nil {
		return 0, fmt.Errorf("move %d rows of shard %d of %s to the dead-letter table: %w", len(dead), l.Shard, s.t, err)
	}
	return n, nil
}

// Incarnation returns the identity of this outbox table, created with it by
// the first migration. Checkpoints carry it, so that a checkpoint written for
// another table (or for this one before it was dropped and created again) is
// never applied.
func (s *Store) Incarnation(ctx context.Context) (string, error) {
	var id string
	if err := s.pool.QueryRow(ctx, `SELECT incarnation::text FROM `+s.t.StateIdent()).Scan(&id); err != nil {
		return "", fmt.Errorf("read incarnation of %s: %w", s.t, err)
	}
	return id, nil
}

// Identity is what every relay of one table must share: the shard count
// (rows map to shards by it), the relay name (the transactional ids) and the
// checkpoint topic, and the delivery mode (an at-least-once relay reads no
// checkpoint, so it would publish again what an exactly-once relay
// committed but did not mark). Relays that differ in any of them never fence
// each other, so the first relay records them and the others must match.
type Identity struct {
	Shards          int
	RelayName       string
	CheckpointTopic string
	Delivery        string
}

// Identity returns the identity recorded for the table, recording the
// fields of want that are not recorded yet first.
func (s *Store) Identity(ctx context.Context, want Identity) (Identity, error) {
	var got Identity
	err := s.pool.QueryRow(ctx, `UPDATE `+s.t.StateIdent()+` SET shards = coalesce(shards, $1),
    relay_name = coalesce(relay_name, $2), checkpoint_topic = coalesce(checkpoint_topic, $3), delivery = coalesce(delivery, $4)
RETURNING shards, relay_name, checkpoint_topic, delivery`, want.Shards, want.RelayName, want.CheckpointTopic, want.Delivery).Scan(&got.Shards, &got.RelayName, &got.CheckpointTopic, &got.Delivery)
	if err != nil {
		return Identity{}, fmt.Errorf("read shard count, relay name, checkpoint topic and delivery mode recorded for %s: %w", s.t, err)
	}
	return got, nil
}

// SetIdentity records a new identity (after a reshard).
func (s *Store) SetIdentity(ctx context.Context, id Identity) error {
	if _, err := s.pool.Exec(ctx, `UPDATE `+s.t.StateIdent()+` SET shards = $1, relay_name = $2, checkpoint_topic = $3, delivery = $4`,
		id.Shards, id.RelayName, id.CheckpointTopic, id.Delivery); err != nil {
		return fmt.Errorf("record shard count, relay name and checkpoint topic of %s: %w", s.t, err)
	}
	return nil
}

// Backlog is the unpublished part of one shard.
type Backlog struct {
	Rows         int64
	OldestCreate time.Time // zero when Rows is 0
}

// Backlog counts the unpublished rows of one shard and finds the oldest.
func (s *Store) Backlog(ctx context.Context, shard, shards int) (Backlog, error) {
	filter, fargs := shardFilter(shard, shards, 1)
	var b Backlog
	var oldest *time.Time
	err := s.pool.QueryRow(ctx, `SELECT count(*), min(created_at) FROM `+s.t.Ident()+
		` WHERE published_at IS NULL`+filter, fargs...).Scan(&b.Rows, &oldest)
	if err != nil {
		return Backlog{}, fmt.Errorf("measure backlog of %s: %w", s.t, err)
	}
	if oldest != nil {
		b.OldestCreate = *oldest
	}
	return b, nil
}

// DeletePublished deletes up to limit rows published before cutoff and
// returns how many it deleted (retention).
func (s *Store) DeletePublished(ctx context.Context, cutoff time.Time, limit int) (int64, error) {
	tag, err := s.pool.Exec(ctx, `DELETE FROM `+s.t.Ident()+` WHERE id IN (SELECT id FROM `+s.t.Ident()+
		` WHERE published_at IS NOT NULL AND published_at < $1 ORDER BY published_at LIMIT $2)`, cutoff, limit)
	if err != nil {
		return 0, fmt.Errorf("delete published rows of %s: %w", s.t, err)
	}
	return tag.RowsAffected(), nil
}

// DeadRow is a row of the dead-letter table.
type DeadRow struct {
	Row
	Error    string
	FailedAt time.Time
	// DiscardedAt and DiscardReason are set once `dlq discard` gave the
	// row up; it is kept for audit and holds nothing.
	DiscardedAt   *time.Time
	DiscardReason string
	// Holds is how many unpublished rows of its topic and key come after
	// it: the rows it holds under HoldKey (0 once discarded).
	Holds int64
	// ValueBytes is the value's size, nil for a tombstone. The value itself
	// (Row.Value) is read only up to ListValueMaxBytes: a dead letter
	// larger than any record (a 200 MiB value) is listed without it.
	ValueBytes *int64
}

// ListValueMaxBytes is the largest value ListDeadLetters reads; larger ones
// come with their size alone (DeadRow.ValueBytes).
const ListValueMaxBytes = 1 << 20

// ListDeadLetters returns up to limit dead letters, oldest first, with the
// rows each one holds, and their values up to ListValueMaxBytes.
func (s *Store) ListDeadLetters(ctx context.Context, limit int) ([]DeadRow, error) {
	return s.ListDeadLettersOrdered(ctx, limit, false)
}

// ListDeadLettersOrdered returns up to limit dead letters, newest first
// (highest id first) when newest is set, else oldest first, with the rows
// each one holds, and their values up to ListValueMaxBytes.
func (s *Store) ListDeadLettersOrdered(ctx context.Context, limit int, newest bool) ([]DeadRow, error) {
	order := "d.id"
	if newest {
		order = "d.id DESC"
	}
	rows, err := s.pool.Query(ctx, `SELECT d.id, d.topic, d.key, CASE WHEN octet_length(d.value) <= $2 THEN d.value END, octet_length(d.value)::bigint, d.headers::text, d.partition, d.created_at, d.error, d.failed_at,
    d.discarded_at, coalesce(d.discard_reason, ''),
    CASE WHEN d.discarded_at IS NULL AND d.key IS NOT NULL THEN (SELECT count(*) FROM `+s.t.Ident()+` o
        WHERE o.topic = d.topic AND o.key = d.key AND o.id > d.id AND o.published_at IS NULL) ELSE 0 END
FROM `+s.t.DeadLetterIdent()+` d ORDER BY `+order+` LIMIT $1`, limit, ListValueMaxBytes)
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, func(r pgx.CollectableRow) (DeadRow, error) {
		var d DeadRow
		var headers *string
		err := r.Scan(&d.ID, &d.Topic, &d.Key, &d.Value, &d.ValueBytes, &headers, &d.Partition, &d.CreatedAt, &d.Error, &d.FailedAt,
			&d.DiscardedAt, &d.DiscardReason, &d.Holds)
		if headers != nil {
			d.Headers = []byte(*headers)
		}
		return d, err
	})
	if err != nil {
		return nil, fmt.Errorf("list dead letters of %s: %w", s.t, err)
	}
	return out, nil
}

// Held counts the unpublished rows of one shard that a dead letter of their
// key holds (see HoldKey), and their distinct keys (topic and key).
func (s *Store) Held(ctx context.Context, shard, shards int) (rows, keys int64, err error) {
	filter, fargs := shardFilter(shard, shards, 1)
	err = s.pool.QueryRow(ctx, `SELECT count(*), count(DISTINCT (topic, key)) FROM `+s.t.Ident()+
		` o WHERE published_at IS NULL AND key IS NOT NULL`+filter+` AND `+s.heldFilter(), fargs...).Scan(&rows, &keys)
	if err != nil {
		return 0, 0, fmt.Errorf("count held rows of %s: %w", s.t, err)
	}
	return rows, keys, nil
}

// Requeue moves dead letters that are not discarded back into the outbox at
// their original position: the same id and created_at, in the one
// statement (one transaction) that deletes them from the dead-letter table.
// A requeued row is therefore read before the rows of its key it held, and
// the key's order is kept. It returns the ids it moved back, in order, and
// an *OvertakenError when it refused some (see RequeueReport).
//
// A requeued row keeps its event id (a dead letter from before migration 7
// has none and gets a new one: it was never published).
//
// Same id and created_at is safe for recovery, which marks a row from a
// checkpoint only when both match (I5): a dead-lettered row was never in a
// committed Kafka transaction. It was dead-lettered under the shard's
// current lease (MoveToDeadLetter refuses a lost lease, ErrLeaseLost), and
// that owner had fenced every earlier producer of the shard and marked what
// they committed before it read a row (I3), so no checkpoint lists it and
// recovery leaves it unpublished until it is published. (At-least-once has
// no fencing: a zombie that sent the row just before it lost the shard may
// have it in Kafka; `outbox-relay verify` reports it as
// dead_letter_in_kafka before you requeue.)
func (s *Store) Requeue(ctx context.Context, ids []int64) ([]int64, error) {
	rep, err := s.RequeueReport(ctx, ids)
	if err != nil {
		return nil, err
	}
	if len(rep.Overtaken) > 0 {
		return rep.Moved, &OvertakenError{Overtaken: rep.Overtaken}
	}
	return rep.Moved, nil
}

// RequeueResult is what Store.RequeueReport did with each id it was given.
type RequeueResult struct {
	// Moved are the dead letters moved back at their own ids, in order.
	Moved []int64
	// Overtaken maps each dead letter refused because a later row of its
	// (current) topic and key is already published to the first such row.
	Overtaken map[int64]int64
	// Discarded are dead letters given up with `dlq discard`: they go back
	// only as new rows.
	Discarded []int64
	// Unknown are ids the dead-letter table does not hold.
	Unknown []int64
}

// OvertakenError is the refusal of Store.Requeue to put a dead letter back
// in place after a later row of its topic and key was published.
type OvertakenError struct {
	// Overtaken maps each refused dead letter to the first later row of its
	// topic and key already published.
	Overtaken map[int64]int64
}

func (e *OvertakenError) Error() string {
	ids := slices.Sorted(maps.Keys(e.Overtaken))
	parts := make([]string, len(ids))
	for i, id := range ids {
		parts[i] = fmt.Sprintf("%d (row %d of its topic and key is published)", id, e.Overtaken[id])
	}
	return "not requeued in place, as it would reach Kafka after later rows of its topic and key: " + strings.Join(parts, ", ") +
		"; requeue them with --as-new (new ids, after everything written) if that order is acceptable"
}

// RequeueReport is Requeue, reporting what became of every id. It puts a
// dead letter back in place only while no later row (a higher id) of its
// topic and key is published: requeued in place it would be read before
// the held rows of its key, but after a published one. That happens when
// an operator changed the dead letter's topic or key in the dead-letter
// table (the new topic and key were never held: their later rows may be in
// Kafka), under OUTBOX_DEAD_LETTER_ORDER=skip, and in at-least-once mode
// for a row of its key acknowledged before the refusal. Published rows are
// seen while they are kept (OUTBOX_ON_PUBLISH=mark, before
// OUTBOX_RETENTION deletes them); under delete they are gone, and the check
// cannot see them. The refused rows stay in the dead-letter table;
// `--as-new` moves them.
func (s *Store) RequeueReport(ctx context.Context, ids []int64) (RequeueResult, error) {
	var res RequeueResult
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	found := map[int64]bool{}
	var move []int64
	rows, err := tx.Query(ctx, `SELECT d.id, d.discarded_at IS NOT NULL,
    CASE WHEN d.key IS NULL OR d.discarded_at IS NOT NULL THEN NULL ELSE (SELECT min(o.id) FROM `+s.t.Ident()+` o
        WHERE o.topic = d.topic AND o.key = d.key AND o.id > d.id AND o.published_at IS NOT NULL) END
FROM `+s.t.DeadLetterIdent()+` d WHERE d.id = ANY($1::bigint[]) FOR UPDATE`, ids)
	if err != nil {
		return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
	}
	for rows.Next() {
		var id int64
		var discarded bool
		var later *int64
		if err := rows.Scan(&id, &discarded, &later); err != nil {
			rows.Close()
			return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
		}
		found[id] = true
		switch {
		case discarded:
			res.Discarded = append(res.Discarded, id)
		case later != nil:
			if res.Overtaken == nil {
				res.Overtaken = map[int64]int64{}
			}
			res.Overtaken[id] = *later
		default:
			move = append(move, id)
		}
	}
	rows.Close()
	if err := rows.Err(); err != nil {
		return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
	}
	for _, id := range ids {
		if !found[id] && !slices.Contains(res.Unknown, id) {
			res.Unknown = append(res.Unknown, id)
		}
	}
	if len(move) > 0 {
		rows, err := tx.Query(ctx, `WITH moved AS (
    DELETE FROM `+s.t.DeadLetterIdent()+` WHERE id = ANY($1::bigint[])
    RETURNING id, topic, key, value, headers, partition, created_at, event_id
)
INSERT INTO `+s.t.Ident()+` (id, topic, key, value, headers, partition, created_at, event_id) OVERRIDING SYSTEM VALUE
SELECT id, topic, key, value, headers, partition, created_at, coalesce(event_id, gen_random_uuid()) FROM moved ORDER BY id
RETURNING id`, move)
		if err != nil {
			return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
		}
		if res.Moved, err = pgx.CollectRows(rows, pgx.RowTo[int64]); err != nil {
			return res, fmt.Errorf("requeue dead letters of %s: %w", s.t, err)
		}
	}
	if err := tx.Commit(ctx); err != nil {
		return RequeueResult{}, fmt.Errorf("requeue dead letters of %s: commit: %w", s.t, err)
	}
	slices.Sort(res.Moved)
	slices.Sort(res.Discarded)
	slices.Sort(res.Unknown)
	return res, nil
}

// DeadLetterIDs returns those of ids that the dead-letter table holds, in
// order.
func (s *Store) DeadLetterIDs(ctx context.Context, ids []int64) ([]int64, error) {
	rows, err := s.pool.Query(ctx, `SELECT id FROM `+s.t.DeadLetterIdent()+` WHERE id = ANY($1::bigint[]) ORDER BY id`, ids)
	if err != nil {
		return nil, fmt.Errorf("look up dead letters of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("look up dead letters of %s: %w", s.t, err)
	}
	return out, nil
}

// RequeueAsNew moves dead letters (discarded or not) back into the outbox
// as new rows: new ids, so they are published after everything already
// written, out of their key's order. They keep their event id: a new
// position, the same event, which a consumer that deduplicates by event id
// (the inbox) applies once even if a copy of it reached Kafka before. It is for a row given up with `dlq
// discard` that must be published after all, as the event it now is. It
// returns the new ids, in the order of the given ids that existed.
func (s *Store) RequeueAsNew(ctx context.Context, ids []int64) ([]int64, error) {
	rows, err := s.pool.Query(ctx, `WITH moved AS (
    DELETE FROM `+s.t.DeadLetterIdent()+` WHERE id = ANY($1::bigint[])
    RETURNING id, topic, key, value, headers, partition, event_id
)
INSERT INTO `+s.t.Ident()+` (topic, key, value, headers, partition, event_id)
SELECT topic, key, value, headers, partition, coalesce(event_id, gen_random_uuid()) FROM moved ORDER BY id
RETURNING id`, ids)
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters of %s as new rows: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("requeue dead letters of %s as new rows: %w", s.t, err)
	}
	return out, nil
}

// Discard gives dead letters up without publishing them: they stay in the
// dead-letter table for audit with reason and the time, and no longer hold
// the later rows of their key, which the relay then publishes. reason must
// not be empty. It returns the ids it discarded (not those already
// discarded or unknown), in order.
func (s *Store) Discard(ctx context.Context, ids []int64, reason string) ([]int64, error) {
	if strings.TrimSpace(reason) == "" {
		return nil, errors.New("discard dead letters: a reason is required (it is kept with the row for audit)")
	}
	rows, err := s.pool.Query(ctx, `UPDATE `+s.t.DeadLetterIdent()+` SET discarded_at = now(), discard_reason = $2
WHERE id = ANY($1::bigint[]) AND discarded_at IS NULL RETURNING id`, ids, reason)
	if err != nil {
		return nil, fmt.Errorf("discard dead letters of %s: %w", s.t, err)
	}
	out, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("discard dead letters of %s: %w", s.t, err)
	}
	slices.Sort(out)
	return out, nil
}
