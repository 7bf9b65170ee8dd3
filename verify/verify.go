// Package verify reconciles Kafka with the outbox table: it proves, for a
// window of rows, that every published row reached Kafka exactly once and
// intact, and finds what did not (missing, duplicated, altered records,
// records of no row, keys out of order, rows waiting too long).
//
// A rolling window (Config.Since) holds the rows created or published in
// it, every unpublished row, and the dead letters created, dead-lettered or
// discarded in it, so that consecutive windows check every row once it is
// in Kafka, however late it was published.
//
// It reads only: one read-only repeatable-read transaction on the table, and
// a read_committed fetch of the topics the window's rows name (and, for a
// rolling window, the dead-letter table's), from the offsets at the oldest
// creation of a window row that may be in Kafka (Kafka's ListOffsets by
// timestamp, less a margin) to the last stable offsets taken after the
// table was read. So every row marked published when the table was read is
// in Kafka below those offsets (I1). Records of ids without a row of the
// window are looked up in both tables afterwards. Memory is one 48-byte
// entry per row of the window, allocated once, one per key and partition
// for the order check, one per record of an id outside the window, and the
// fetch buffers (2 MiB a partition, 8 partitions at a time); records are
// streamed, never held.
//
// With OUTBOX_ON_PUBLISH=delete (Config.OnPublish) a published row is gone
// from the table, so verify reads Kafka from Config.Since ago (the table
// cannot say when deleted rows were created), in the topics the remaining
// rows name and Config.Topics (it cannot say where they went), and counts a
// record whose outbox-id has no row as Deleted: published, then deleted. Its
// content cannot be compared, a phantom cannot be told from it, and a row
// deleted without being published cannot be found; duplicates (one
// outbox-id twice), key order, dead letters in Kafka and rows left in the
// table are checked as in mark mode. One entry per deleted record's id is
// kept (for the duplicate check).
package verify

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	"log/slog"
	"maps"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/txn"
)

// Config says what to verify and how to reach it.
type Config struct {
	// Pool reaches the database; verify runs one read-only transaction.
	Pool *pgxpool.Pool
	// Table is the outbox table (its dead-letter table is read too).
	Table outbox.Table
	// Brokers and KafkaOptions reach Kafka (TLS, SASL).
	Brokers      []string
	KafkaOptions []kgo.Opt
	// CheckpointTopic is never read as a row topic.
	CheckpointTopic string
	// The window: rows with FromID <= id <= ToID when ToID > 0, else rows
	// created in the last Since.
	Since        time.Duration
	FromID, ToID int64
	// Margin is subtracted from the window's oldest created_at to find
	// the start offsets, for clock skew between the database and the
	// relay (default 10 minutes).
	Margin time.Duration
	// Stale: an unpublished row older than this is a finding (0: 5 minutes).
	Stale time.Duration
	// Limit is how many findings the report lists (0: 20); all are counted.
	Limit int
	// Logger receives progress and retries (default: discard).
	Logger *slog.Logger
	// OnPublish is the relay's OUTBOX_ON_PUBLISH (empty: mark). Under
	// outbox.Delete a record whose outbox-id has no row is a row published
	// and deleted (Report.Deleted), not a phantom; Kafka is read from Since
	// ago (less Margin) even for an id window, or from the window's oldest
	// row if older; and an unpublished row that a committed record holds
	// for longer than Stale is a NotDeleted finding. Also right for a table
	// where relays in mark mode ran too.
	OnPublish outbox.OnPublish
	// Topics are read besides the topics the window's rows name: under
	// Delete, name the topics of the deleted rows, which the table no
	// longer holds.
	Topics []string
	// AllowForeign accepts records without a valid outbox-id header on the
	// topics read (a topic other producers share): they are counted
	// (Report.Foreign) but are no Foreign finding.
	AllowForeign bool
	// DeadLetterOrder is the relay's OUTBOX_DEAD_LETTER_ORDER (empty:
	// hold-key). Under hold-key a key's order is a promise, and an
	// inversion no late commit can explain is an OrderBroken finding.
	DeadLetterOrder outbox.DeadLetterOrder
}

// Kinds of findings.
const (
	Missing          = "missing"              // marked published, not in Kafka
	Duplicate        = "duplicate"            // in Kafka more than once
	Differ           = "differ"               // key, value, headers or partition differ from the row
	Phantom          = "phantom"              // an outbox-id of the window matching no row nor dead letter
	DeadInKafka      = "dead_letter_in_kafka" // dead-lettered, yet committed in Kafka
	OutOfOrder       = "out_of_order"         // a warning: a key's records not in id order on their partition
	StaleUnpublished = "stale_unpublished"    // unpublished for longer than Stale
	// NotDeleted (delete mode): a committed record holds the row, yet it
	// is still in the table, unpublished, after Stale: recovery deletes it
	// only within its window; past it the row is published again.
	NotDeleted = "published_not_deleted"
	// Foreign: a record on a topic read without a valid outbox-id header
	// (none, not a canonical decimal id, or a near-miss name such as
	// Outbox-Id): no row's, and not the relay's.
	Foreign = "foreign"
	// OrderBroken (hold-key): a key's records not in id order on their
	// partition, where no late commit explains it.
	OrderBroken = "order_broken"
)

// Finding is one discrepancy.
type Finding struct {
	Kind      string  `json:"kind"`
	ID        int64   `json:"id"`
	Topic     string  `json:"topic,omitempty"`
	Partition int32   `json:"partition"`
	Offsets   []int64 `json:"offsets,omitempty"`
	Detail    string  `json:"detail"`
}

// Report is what Run found.
type Report struct {
	Table        string    `json:"table"`
	FromID       int64     `json:"from_id"`
	ToID         int64     `json:"to_id"`
	Since        time.Time `json:"since,omitzero"`
	Rows         int       `json:"rows"`
	Published    int       `json:"published"`
	Unpublished  int       `json:"unpublished"`
	DeadLettered int       `json:"dead_lettered"`
	Records      int       `json:"records"` // records read whose outbox-id is in the window
	// OnPublish is the mode verified for: mark, or delete.
	OnPublish string `json:"on_publish"`
	// Deleted (delete mode): outbox-ids of the window in Kafka whose row is
	// neither in the table nor in the dead-letter table: published and
	// deleted. Their content cannot be compared with a row.
	Deleted int `json:"deleted"`
	// Foreign counts the records without a valid outbox-id header (also
	// when Config.AllowForeign accepts them).
	Foreign int `json:"foreign"`
	// InvalidTopic counts the window's rows whose topic is no Kafka topic
	// name (such as ''): no record can hold them; the relay dead-letters
	// them.
	InvalidTopic int `json:"invalid_topic"`
	// Counts by kind; OutOfOrder is a warning and does not make the
	// report unclean.
	Counts   map[string]int `json:"counts"`
	Findings []Finding      `json:"findings"`
	Elapsed  time.Duration  `json:"elapsed_ns"`
}

// Clean reports whether nothing but warnings was found.
func (r *Report) Clean() bool {
	for k, n := range r.Counts {
		if k != OutOfOrder && n > 0 {
			return false
		}
	}
	return true
}

// ErrCannotCheck wraps every reason Run could not check the window (the
// database or Kafka unreachable, records of the window already deleted by
// Kafka's retention).
var ErrCannotCheck = errors.New("could not verify")

// ErrKafka wraps, besides ErrCannotCheck, the errors of reaching Kafka
// (the brokers unreachable, refused, or TLS and SASL settings wrong).
var ErrKafka = errors.New("kafka")

// ErrNotMigrated wraps, besides ErrCannotCheck, a table or column that does
// not exist: the outbox table is not migrated (`outbox-relay migrate up`).
var ErrNotMigrated = errors.New("not migrated")

// row is what verify keeps of one row: about 64 bytes.
type row struct {
	id        int64
	created   int64 // unix microseconds
	sum       uint64
	topic     int32  // index into topics
	partition int32  // expected partition; -1 unknown (topic missing)
	mark      uint32 // xmin: the transaction that marked (or inserted) the row
	state     uint8
	seen      int32
	firstOff  int64
}

const (
	statePublished uint8 = iota
	stateUnpublished
	stateDead
)

// Run verifies the window of cfg and returns the report. An error wrapping
// ErrCannotCheck means the check could not be made.
func Run(ctx context.Context, cfg Config) (*Report, error) {
	start := time.Now()
	if cfg.Margin <= 0 {
		cfg.Margin = 10 * time.Minute
	}
	if cfg.Stale <= 0 {
		cfg.Stale = 5 * time.Minute
	}
	if cfg.Limit <= 0 {
		cfg.Limit = 20
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	v := &verifier{cfg: cfg, rep: &Report{Table: cfg.Table.String(), Counts: map[string]int{}}, topicIdx: map[string]int32{}}
	for _, k := range []string{Missing, Duplicate, Differ, Phantom, DeadInKafka, OutOfOrder, StaleUnpublished, Foreign, OrderBroken} {
		v.rep.Counts[k] = 0
	}
	v.rep.OnPublish = string(outbox.Mark)
	if cfg.OnPublish == outbox.Delete {
		v.rep.OnPublish = string(outbox.Delete)
		v.rep.Counts[NotDeleted] = 0
		v.gone = map[int64]*goneRecord{}
	}
	cl, err := kgo.NewClient(append([]kgo.Opt{kgo.SeedBrokers(cfg.Brokers...), kgo.WithLogger(txn.KafkaLogger(cfg.Logger, kgo.LogLevelWarn))}, cfg.KafkaOptions...)...)
	if err != nil {
		return nil, fmt.Errorf("%w: kafka client: %w", ErrCannotCheck, err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	if err := v.readTable(ctx, adm); err != nil {
		if pe := (*pgconn.PgError)(nil); errors.As(err, &pe) && (pe.Code == "42P01" || pe.Code == "42703") {
			return nil, fmt.Errorf("%w: %w: read %s: %w: run `outbox-relay migrate up` with the same schema and table (OUTBOX_SCHEMA, OUTBOX_TABLE)", ErrCannotCheck, ErrNotMigrated, cfg.Table, err)
		}
		if errors.Is(err, ErrKafka) {
			return nil, fmt.Errorf("%w: %w", ErrCannotCheck, err)
		}
		return nil, fmt.Errorf("%w: read %s: %w", ErrCannotCheck, cfg.Table, err)
	}
	if err := v.readKafka(ctx, cl, adm); err != nil {
		return nil, fmt.Errorf("%w: %w at %s: %w", ErrCannotCheck, ErrKafka, strings.Join(cfg.Brokers, ","), err)
	}
	if err := v.phantoms(ctx); err != nil {
		return nil, fmt.Errorf("%w: read %s: %w", ErrCannotCheck, cfg.Table, err)
	}
	v.conclude()
	if len(v.truncated) > 0 {
		// A copy deleted by retention hides a duplicate as well as a
		// row: nothing about these partitions can be proven.
		v.rep.Elapsed = time.Since(start)
		return v.rep, fmt.Errorf("%w: the log start of %v is past the window's start (Kafka's retention or DeleteRecords removed records of the window), so a missing row or the first copy of a duplicate may be gone: verify a window within the topics' retention (-since or -from-id)", ErrCannotCheck, v.truncated)
	}
	v.rep.Elapsed = time.Since(start)
	return v.rep, nil
}

type verifier struct {
	cfg          Config
	rep          *Report
	rows         []row // sorted by id
	minID, maxID int64
	topics       []string
	partitions   []int // by topic index; 0: the topic does not exist
	topicIdx     map[string]int32
	oldest       time.Time
	now          time.Time
	truncated    []string // partitions whose retention cut into the window
	orphans      []orphan // records of ids without a row of the window
	// createdMin is the lowest id of the rows created in the window: a
	// record of an id from there on that no table has is a phantom.
	createdMin int64
	// gone (delete mode only) are the outbox-ids read without a row of the
	// window, by id: the records of deleted rows.
	gone map[int64]*goneRecord

	mu       sync.Mutex
	findings []Finding
}

// readTable reads the window's rows and dead letters in one read-only,
// repeatable-read transaction (one snapshot for both tables). It learns the
// partition counts of the rows' topics first, so that each row's expected
// partition is computed as the relay computes it, while its key is at hand.
func (v *verifier) readTable(ctx context.Context, adm *kadm.Client) error {
	tx, err := v.cfg.Pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead, AccessMode: pgx.ReadOnly})
	if err != nil {
		return err
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // read-only
	if err := tx.QueryRow(ctx, `SELECT now()`).Scan(&v.now); err != nil {
		return err
	}
	// A rolling window (-since) selects every row that changed in it:
	// created, published, dead-lettered or discarded, and every row not
	// yet published; so consecutive windows check each row whenever it
	// reached Kafka, also a row requeued or held long after its creation.
	where, args := `id BETWEEN $1 AND $2`, []any{v.cfg.FromID, v.cfg.ToID}
	deadWhere := where
	v.rep.FromID, v.rep.ToID = v.cfg.FromID, v.cfg.ToID
	if v.cfg.ToID <= 0 {
		v.rep.Since = v.now.Add(-v.cfg.Since)
		args = []any{v.rep.Since}
		where = `(created_at >= $1 OR published_at >= $1 OR published_at IS NULL)`
		deadWhere = `(created_at >= $1 OR failed_at >= $1 OR discarded_at >= $1)`
	}
	sources := []struct {
		table, published, where, mark string
		state                         uint8
	}{
		{v.cfg.Table.Ident(), "published_at IS NOT NULL", where, "xmin::text::bigint", statePublished},
		{v.cfg.Table.DeadLetterIdent(), "false", deadWhere, "0::bigint", stateDead},
	}
	// The topics, and the number of rows: the row entries are allocated
	// once, at their size. A rolling window reads the topics of every
	// dead letter too: a dead letter's record may reach Kafka long after.
	allDead := ""
	if v.cfg.ToID <= 0 {
		allDead = `
    UNION ALL SELECT DISTINCT topic, 0 FROM ` + sources[1].table
	}
	topicRows, err := tx.Query(ctx, `SELECT topic, sum(n)::bigint FROM (
    SELECT topic, count(*) AS n FROM `+sources[0].table+` WHERE `+where+` GROUP BY topic
    UNION ALL SELECT topic, count(*) FROM `+sources[1].table+` WHERE `+deadWhere+` GROUP BY topic`+allDead+`) t GROUP BY topic`, args...)
	if err != nil {
		return err
	}
	var names []string
	total := 0
	var name string
	var n int64
	if _, err := pgx.ForEachRow(topicRows, []any{&name, &n}, func() error {
		names = append(names, name)
		total += int(n)
		return nil
	}); err != nil {
		return err
	}
	for _, t := range v.cfg.Topics {
		if !slices.Contains(names, t) {
			names = append(names, t)
		}
	}
	if err := v.learnTopics(ctx, adm, names); err != nil {
		return fmt.Errorf("%w at %s: %w", ErrKafka, strings.Join(v.cfg.Brokers, ","), err)
	}
	v.rows = make([]row, 0, total)
	for _, src := range sources {
		rows, err := tx.Query(ctx, `SELECT id, topic, key, value, headers::text, partition, created_at, event_id::text, `+src.published+`, `+src.mark+
			` FROM `+src.table+` WHERE `+src.where, args...)
		if err != nil {
			return err
		}
		var (
			id        int64
			topic     string
			key, val  []byte
			headers   *string
			partition *int32
			created   time.Time
			eventID   *string
			published bool
			mark      int64
		)
		_, err = pgx.ForEachRow(rows, []any{&id, &topic, &key, &val, &headers, &partition, &created, &eventID, &published, &mark}, func() error {
			r := row{id: id, created: created.UnixMicro(), topic: v.topicIdx[topic], partition: -1, firstOff: -1, state: src.state, mark: uint32(mark)}
			if src.state != stateDead && !published {
				r.state = stateUnpublished
			}
			if outbox.ValidTopic(topic) != nil {
				v.rep.InvalidTopic++
			}
			r.sum = recordSum(key, val, rowHeaders(eventID, headers))
			if n := v.partitions[r.topic]; n > 0 {
				p := int32(-1)
				if partition != nil {
					p = *partition
				}
				r.partition = txn.PartitionOf(key, id, p, n)
			}
			v.rows = append(v.rows, r)
			// Kafka is read from the oldest creation of a row that may be
			// in Kafka, so that every copy of it is read; an unpublished
			// row created before the window cannot have been published
			// before it began (a committed record of it before then is
			// found only in delete mode's published_not_deleted check).
			c := created
			if r.state == stateUnpublished && !v.rep.Since.IsZero() && c.Before(v.rep.Since) {
				c = v.rep.Since
			}
			if v.oldest.IsZero() || c.Before(v.oldest) {
				v.oldest = c
			}
			if (v.rep.Since.IsZero() || !created.Before(v.rep.Since)) && (v.createdMin == 0 || id < v.createdMin) {
				v.createdMin = id
			}
			return nil
		})
		if err != nil {
			return err
		}
	}
	slices.SortFunc(v.rows, func(a, b row) int { return cmpInt(a.id, b.id) })
	for _, r := range v.rows {
		switch r.state {
		case statePublished:
			v.rep.Published++
		case stateUnpublished:
			v.rep.Unpublished++
		case stateDead:
			v.rep.DeadLettered++
		}
	}
	v.rep.Rows = len(v.rows)
	if len(v.rows) > 0 {
		v.minID, v.maxID = v.rows[0].id, v.rows[len(v.rows)-1].id
		if v.cfg.ToID <= 0 {
			v.rep.FromID, v.rep.ToID = v.minID, v.maxID
		}
	}
	if v.createdMin == 0 {
		v.createdMin = v.maxID + 1
	}
	if !v.rep.Since.IsZero() && (v.oldest.IsZero() || v.rep.Since.Before(v.oldest)) {
		v.oldest = v.rep.Since // a dead letter's record may reach Kafka late
	}
	return nil
}

// learnTopics records the topics' indexes and partition counts; a topic
// that does not exist has none (its rows cannot be in Kafka).
func (v *verifier) learnTopics(ctx context.Context, adm *kadm.Client, names []string) error {
	v.partitions = make([]int, len(names))
	v.topics = names
	for i, n := range names {
		v.topicIdx[n] = int32(i)
	}
	// A row's topic Kafka cannot name (such as '') cannot be asked for:
	// its rows are counted as InvalidTopic, the others are checked.
	var valid []string
	for _, n := range names {
		if outbox.ValidTopic(n) == nil {
			valid = append(valid, n)
		}
	}
	if len(valid) == 0 {
		return nil
	}
	td, err := adm.ListTopics(ctx, valid...)
	if err != nil {
		return fmt.Errorf("topic metadata: %w", err)
	}
	for i, n := range names {
		if t, ok := td[n]; ok && t.Err == nil {
			v.partitions[i] = len(t.Partitions)
		}
	}
	return nil
}

func cmpInt(a, b int64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// rowHeaders returns the headers the relay sends after outbox-id for a row
// with event id eventID (nil for a row from before migration 7, which
// gets none) and headers column col, in its order: "outbox-event-id"
// first, then the row's headers sorted by name (bytewise, as the relay
// sorts them; not jsonb's order), one per name (jsonb keeps one). A column
// the relay refuses (not an object of string to string) gives what it
// parses to, which matters only for a dead letter, whose content is not
// compared. A record of the row whose event id is missing or another is
// therefore `differ`.
func rowHeaders(eventID, col *string) []kgo.RecordHeader {
	var out []kgo.RecordHeader
	if eventID != nil {
		out = append(out, kgo.RecordHeader{Key: txn.HeaderEventID, Value: []byte(*eventID)})
	}
	if col == nil {
		return out
	}
	var h map[string]any
	_ = json.Unmarshal([]byte(*col), &h)
	for _, k := range slices.Sorted(maps.Keys(h)) {
		s, _ := h[k].(string)
		out = append(out, kgo.RecordHeader{Key: k, Value: []byte(s)})
	}
	return out
}

// recordSum is a 64-bit FNV-1a digest of what a record must carry for its
// row: key, value (nil and empty differ) and the headers after outbox-id,
// as the ordered list they are (a repeated, extra, missing or reordered
// header changes it).
func recordSum(key, value []byte, headers []kgo.RecordHeader) uint64 {
	h := fnv.New64a()
	field := func(b []byte, isNil bool) {
		var n [9]byte
		if isNil {
			n[0] = 1
		}
		l := len(b)
		for i := 1; i < 9; i++ {
			n[i] = byte(l >> (8 * (i - 1)))
		}
		h.Write(n[:])
		h.Write(b)
	}
	field(key, key == nil)
	field(value, value == nil)
	for _, hd := range headers {
		field([]byte(hd.Key), false)
		field(hd.Value, false)
	}
	return h.Sum64()
}

// find returns the index of id's row, or -1.
func (v *verifier) find(id int64) int {
	i := sort.Search(len(v.rows), func(i int) bool { return v.rows[i].id >= id })
	if i < len(v.rows) && v.rows[i].id == id {
		return i
	}
	return -1
}

func (v *verifier) add(f Finding) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.rep.Counts[f.Kind]++
	if len(v.findings) < v.cfg.Limit*4 {
		v.findings = append(v.findings, f)
	}
}

// readKafka reads every partition of the window's topics with
// read_committed, from the offsets at the window's start to the last stable
// offsets, and checks each record against its row.
func (v *verifier) readKafka(ctx context.Context, cl *kgo.Client, adm *kadm.Client) error {
	var topics []string
	for i, t := range v.topics {
		if v.partitions[i] > 0 && t != v.cfg.CheckpointTopic {
			topics = append(topics, t)
		}
	}
	if len(topics) == 0 || v.oldest.IsZero() && !v.deleting() {
		return nil
	}
	from := v.oldest.Add(-v.cfg.Margin)
	if v.deleting() {
		// The table no longer says when deleted rows were created.
		if since := v.now.Add(-v.cfg.Since); v.oldest.IsZero() || since.Before(v.oldest) {
			from = since.Add(-v.cfg.Margin)
		}
	}
	starts, err := adm.ListOffsetsAfterMilli(ctx, from.UnixMilli(), topics...)
	if err != nil {
		return fmt.Errorf("offsets at %s: %w", from.Format(time.RFC3339), err)
	}
	logStarts, err := adm.ListStartOffsets(ctx, topics...)
	if err != nil {
		return fmt.Errorf("log start offsets: %w", err)
	}
	ends, err := adm.ListCommittedOffsets(ctx, topics...)
	if err != nil {
		return fmt.Errorf("last stable offsets: %w", err)
	}
	type part struct {
		topic     string
		partition int32
		from, end int64
		truncated bool
	}
	var parts []part
	var ferr error
	ends.Each(func(o kadm.ListedOffset) {
		if o.Err != nil {
			ferr = errors.Join(ferr, fmt.Errorf("last stable offset of %s/%d: %w", o.Topic, o.Partition, o.Err))
			return
		}
		s, ok := starts.Lookup(o.Topic, o.Partition)
		if !ok || s.Err != nil {
			ferr = errors.Join(ferr, fmt.Errorf("offset by time of %s/%d: %v", o.Topic, o.Partition, s.Err))
			return
		}
		ls, _ := logStarts.Lookup(o.Topic, o.Partition)
		p := part{topic: o.Topic, partition: o.Partition, from: s.Offset, end: o.Offset}
		if p.from < 0 || p.from > p.end { // no record after the time: nothing to read
			p.from = p.end
		}
		// The first retained record is newer than the window's start and
		// earlier ones were deleted: the window reaches past Kafka's
		// retention.
		p.truncated = ls.Err == nil && ls.Offset > 0 && p.from == ls.Offset
		parts = append(parts, p)
	})
	if ferr != nil {
		return ferr
	}
	var (
		wg    sync.WaitGroup
		sem   = make(chan struct{}, 8)
		errMu sync.Mutex
		errs  error
	)
	for _, p := range parts {
		if p.truncated {
			v.truncated = append(v.truncated, fmt.Sprintf("%s/%d", p.topic, p.partition))
		}
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			order := map[string]int64{}
			err := txn.ReadCommitted(ctx, cl, p.topic, p.partition, p.from, p.end, v.cfg.Logger, func(r *kgo.Record) {
				v.check(r, order)
			})
			if err != nil {
				errMu.Lock()
				errs = errors.Join(errs, err)
				errMu.Unlock()
			}
		}()
	}
	wg.Wait()
	return errs
}

// check compares one record with its row.
func (v *verifier) check(r *kgo.Record, order map[string]int64) {
	id, headers, problem := outboxID(r.Headers)
	if id < 0 {
		v.mu.Lock()
		v.rep.Foreign++
		v.mu.Unlock()
		if !v.cfg.AllowForeign {
			v.add(Finding{Kind: Foreign, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset},
				Detail: problem + ": no row's record, and not the relay's (a topic other producers share: -allow-foreign)"})
		}
		return
	}
	if problem != "" {
		v.add(Finding{Kind: Differ, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset}, Detail: problem})
	}
	if v.deleting() {
		if id < 1 || v.cfg.ToID > 0 && (id < v.cfg.FromID || id > v.cfg.ToID) {
			return // no outbox-id, or outside the id window
		}
		if i := v.find(id); i < 0 {
			v.deleted(r, id, order)
			return
		}
	}
	if v.cfg.ToID > 0 && (id < v.cfg.FromID || id > v.cfg.ToID) {
		return // outside the id window
	}
	i := v.find(id)
	if i < 0 {
		// A row written after the table was read, a row outside the
		// window (a dead letter whose record came late), or a phantom:
		// looked up once Kafka is read.
		v.orphan(r, id)
		return
	}
	v.mu.Lock()
	v.rep.Records++
	row := &v.rows[i]
	row.seen++
	first := row.firstOff
	if row.seen == 1 {
		row.firstOff = r.Offset
	}
	seen, state, sum, partition, topic, mark := row.seen, row.state, row.sum, row.partition, v.topics[row.topic], row.mark
	v.mu.Unlock()
	switch {
	case state == stateDead:
		v.add(Finding{Kind: DeadInKafka, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset},
			Detail: "the row is in the dead-letter table, yet a committed record holds it: `dlq requeue` would publish it twice"})
	case seen == 2: // a row is one duplicate, however many times it repeats
		v.add(Finding{Kind: Duplicate, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{first, r.Offset},
			Detail: fmt.Sprintf("committed %d times", seen)})
	}
	// Order is checked on first sightings: a duplicate is behind by nature
	// and reported as such.
	if r.Key != nil && seen == 1 {
		k := string(r.Key)
		if last, ok := order[k]; ok && id < last {
			v.outOfOrder(r, id, last, state, mark)
		}
		order[k] = max(order[k], id)
	}
	var diffs []string
	if r.Topic != topic {
		diffs = append(diffs, fmt.Sprintf("topic %q, row says %q", r.Topic, topic))
	}
	if partition >= 0 && r.Partition != partition {
		diffs = append(diffs, fmt.Sprintf("partition %d, the row maps to %d", r.Partition, partition))
	}
	if state != stateDead && recordSum(r.Key, r.Value, headers) != sum {
		diffs = append(diffs, "key, value or headers differ from the row")
	}
	if len(diffs) > 0 {
		v.add(Finding{Kind: Differ, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset}, Detail: fmt.Sprint(diffs)})
	}
}

// outboxID finds a record's outbox-id: the first header, named exactly
// outbox-id, a canonical decimal id >= 1. It returns -1 and why for a
// foreign record (none, unparsable, or only a near-miss name); else the id,
// the headers after it, and a problem that makes the record differ from
// what the relay sends (outbox-id not first, or twice).
func outboxID(hs []kgo.RecordHeader) (int64, []kgo.RecordHeader, string) {
	at, n := -1, 0
	for i, h := range hs {
		if h.Key == txn.HeaderOutboxID {
			n++
			if at < 0 {
				at = i
			}
		}
	}
	if at < 0 {
		for _, h := range hs {
			if outbox.IsReservedHeader(h.Key) {
				return -1, nil, fmt.Sprintf("header %q is not %q", h.Key, txn.HeaderOutboxID)
			}
		}
		return -1, nil, "no outbox-id header"
	}
	val := string(hs[at].Value)
	id, err := strconv.ParseInt(val, 10, 64)
	if err != nil || id < 1 || strconv.FormatInt(id, 10) != val {
		return -1, nil, fmt.Sprintf("outbox-id %q is not a row id (a decimal number >= 1)", val)
	}
	rest := make([]kgo.RecordHeader, 0, len(hs)-1)
	rest = append(rest, hs[:at]...)
	rest = append(rest, hs[at+1:]...)
	switch {
	case n > 1:
		return id, rest, "two outbox-id headers"
	case at > 0:
		return id, rest, "outbox-id is not the first header"
	}
	return id, rest, ""
}

// outOfOrder reports id, read after last of its key on one partition.
// Under hold-key it is OrderBroken when both rows were marked published by
// one transaction (the same xmin): the relay read them together, so no late
// commit explains it. Otherwise verify cannot tell: the mark rewrote both
// rows, so the commit time of their inserts is gone (the xmin, and so
// pg_xact_commit_timestamp, is the mark's, also with
// track_commit_timestamp on).
func (v *verifier) outOfOrder(r *kgo.Record, id, last int64, state uint8, mark uint32) {
	if v.cfg.DeadLetterOrder != outbox.Skip && state == statePublished && mark != 0 {
		v.mu.Lock()
		j := v.find(last)
		together := j >= 0 && v.rows[j].state == statePublished && v.rows[j].mark == mark
		v.mu.Unlock()
		if together {
			v.add(Finding{Kind: OrderBroken, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset},
				Detail: fmt.Sprintf("key %q: id %d after id %d, both marked published by one transaction (read together: no late commit explains it); hold-key promises id order per key", r.Key, id, last)})
			return
		}
	}
	v.add(Finding{Kind: OutOfOrder, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset},
		Detail: fmt.Sprintf("key %q: id %d after id %d; verify cannot tell a late commit (two transactions wrote the key without locking it; see docs/guarantees.md, the order limit) from a broken order: the rows were marked apart and the mark overwrote their insert's commit time", r.Key, id, last)})
}

// goneRecord is what verify keeps, in delete mode, of an outbox-id read
// without a row of the window.
type goneRecord struct {
	seen      int32
	partition int32
	firstOff  int64
	topic     string
}

func (v *verifier) deleting() bool { return v.gone != nil }

// deleted notes, in delete mode, a record whose id has no row of the window:
// the record of a row published and deleted (looked up once Kafka is read:
// the row may be in the table outside the window). Its content cannot be
// compared; a second record of the id is a duplicate, and the order of its
// key is checked as for a row's.
func (v *verifier) deleted(r *kgo.Record, id int64, order map[string]int64) {
	v.mu.Lock()
	g := v.gone[id]
	if g == nil {
		g = &goneRecord{partition: r.Partition, firstOff: r.Offset, topic: r.Topic}
		v.gone[id] = g
	}
	g.seen++
	seen, first := g.seen, g.firstOff
	v.rep.Records++
	v.mu.Unlock()
	if seen == 2 {
		v.add(Finding{Kind: Duplicate, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{first, r.Offset},
			Detail: "committed twice (the row is deleted: its content cannot be compared)"})
	}
	if r.Key != nil && seen == 1 {
		k := string(r.Key)
		if last, ok := order[k]; ok && id < last {
			v.outOfOrder(r, id, last, stateUnpublished, 0)
		}
		order[k] = max(order[k], id)
	}
}

// orphan is a record whose id has no row of the window.
type orphan struct {
	f  Finding
	ts time.Time
}

// orphan notes a record whose id has no row of the window.
func (v *verifier) orphan(r *kgo.Record, id int64) {
	v.mu.Lock()
	defer v.mu.Unlock()
	v.orphans = append(v.orphans, orphan{f: Finding{Kind: Phantom, ID: id, Topic: r.Topic, Partition: r.Partition, Offsets: []int64{r.Offset},
		Detail: "a record with this outbox-id, but no such row in the table nor in the dead-letter table"}, ts: r.Timestamp})
}

// phantoms keeps, of the records without a row of the window, those whose id
// is neither in the table nor in the dead-letter table at all.
func (v *verifier) phantoms(ctx context.Context) error {
	if v.deleting() {
		return v.countDeleted(ctx)
	}
	if len(v.orphans) == 0 {
		return nil
	}
	ids := make([]int64, len(v.orphans))
	for i, o := range v.orphans {
		ids[i] = o.f.ID
	}
	type where struct {
		dead      bool
		published *time.Time
	}
	exists := map[int64]where{}
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), 50000)]
		ids = ids[len(chunk):]
		rows, err := v.cfg.Pool.Query(ctx, `SELECT id, false, published_at FROM `+v.cfg.Table.Ident()+` WHERE id = ANY($1)
UNION ALL SELECT id, true, NULL FROM `+v.cfg.Table.DeadLetterIdent()+` WHERE id = ANY($1)`, chunk)
		if err != nil {
			return fmt.Errorf("look up %d ids in %s and its dead-letter table: %w", len(chunk), v.cfg.Table, err)
		}
		var (
			id   int64
			dead bool
			pub  *time.Time
		)
		if _, err := pgx.ForEachRow(rows, []any{&id, &dead, &pub}, func() error {
			exists[id] = where{dead: dead, published: pub}
			return nil
		}); err != nil {
			return fmt.Errorf("look up %d ids in %s and its dead-letter table: %w", len(chunk), v.cfg.Table, err)
		}
	}
	for _, o := range v.orphans {
		w, ok := exists[o.f.ID]
		f := o.f
		switch {
		case !ok && f.ID >= v.createdMin:
			v.add(f)
		case ok && w.dead:
			f.Kind, f.Detail = DeadInKafka, "the row (outside the window) is in the dead-letter table, yet a committed record holds it: `dlq requeue` would publish it twice"
			v.add(f)
		case ok && w.published != nil && o.ts.After(w.published.Add(v.cfg.Margin)):
			// Marked published means a committed record held it by then
			// (I1): a record produced after that is a second copy.
			f.Kind, f.Detail = Duplicate, fmt.Sprintf("a copy produced at %s, after the row (outside the window) was marked published at %s (less -margin)",
				o.ts.UTC().Format(time.RFC3339), w.published.UTC().Format(time.RFC3339))
			v.add(f)
		}
	}
	return nil
}

// countDeleted counts, in delete mode, the ids read without a row of the
// window that are neither in the table nor in the dead-letter table at all:
// rows published and deleted. (Ids of rows outside the window are left out,
// as mark mode leaves them out of the phantoms.)
func (v *verifier) countDeleted(ctx context.Context) error {
	ids := slices.Sorted(maps.Keys(v.gone))
	// An id above the last value of the table's id sequence was never
	// handed out: its record is no row's of this table (another database
	// or table publishing into the topic, a forged record), and is a
	// phantom, not a deleted row. last_value is NULL when the sequence has
	// not handed out an id or this role may not read it: then nothing is
	// concluded.
	var last *int64
	if err := v.cfg.Pool.QueryRow(ctx, `SELECT s.last_value FROM pg_sequences s
WHERE format('%I.%I', s.schemaname, s.sequencename) = pg_get_serial_sequence($1, 'id')`, v.cfg.Table.Ident()).Scan(&last); err != nil && !errors.Is(err, pgx.ErrNoRows) {
		return err
	}
	if last != nil {
		cut, _ := slices.BinarySearch(ids, *last+1)
		for _, id := range ids[cut:] {
			g := v.gone[id]
			v.add(Finding{Kind: Phantom, ID: id, Topic: g.topic, Partition: g.partition, Offsets: []int64{g.firstOff},
				Detail: fmt.Sprintf("a record with this outbox-id, above the last id the table's sequence handed out (%d): no row of this table had it", *last)})
		}
		ids = ids[:cut]
	}
	for len(ids) > 0 {
		chunk := ids[:min(len(ids), 50000)]
		ids = ids[len(chunk):]
		found, err := v.inTables(ctx, chunk)
		if err != nil {
			return err
		}
		v.rep.Deleted += len(chunk) - len(found)
	}
	return nil
}

// inTables returns those of ids that are rows of the table or of the
// dead-letter table, now.
func (v *verifier) inTables(ctx context.Context, ids []int64) ([]int64, error) {
	rows, err := v.cfg.Pool.Query(ctx, `SELECT id FROM `+v.cfg.Table.Ident()+` WHERE id = ANY($1)
UNION SELECT id FROM `+v.cfg.Table.DeadLetterIdent()+` WHERE id = ANY($1)`, ids)
	if err != nil {
		return nil, fmt.Errorf("look up %d ids in %s and its dead-letter table: %w", len(ids), v.cfg.Table, err)
	}
	found, err := pgx.CollectRows(rows, pgx.RowTo[int64])
	if err != nil {
		return nil, fmt.Errorf("look up %d ids in %s and its dead-letter table: %w", len(ids), v.cfg.Table, err)
	}
	return found, nil
}

// conclude finds the rows Kafka lacks and the rows waiting too long, and
// orders the findings (by kind, then id).
func (v *verifier) conclude() {
	staleBefore := v.now.Add(-v.cfg.Stale).UnixMicro()
	for _, r := range v.rows {
		switch {
		case r.state == statePublished && r.seen == 0:
			v.add(Finding{Kind: Missing, ID: r.id, Topic: v.topics[r.topic], Partition: r.partition,
				Detail: "marked published, but no committed record holds it"})
		case v.deleting() && r.state == stateUnpublished && r.seen > 0 && r.created < staleBefore:
			v.add(Finding{Kind: NotDeleted, ID: r.id, Topic: v.topics[r.topic], Partition: r.partition, Offsets: []int64{r.firstOff},
				Detail: fmt.Sprintf("a committed record holds the row, yet it is still in the table, unpublished, since %s: the relay's delete did not happen (recovery deletes it only within OUTBOX_RECOVERY_WINDOW; past it the row is published again)",
					time.UnixMicro(r.created).UTC().Format(time.RFC3339))})
		case r.state == stateUnpublished && r.seen == 0 && r.created < staleBefore:
			v.add(Finding{Kind: StaleUnpublished, ID: r.id, Topic: v.topics[r.topic], Partition: r.partition,
				Detail: fmt.Sprintf("unpublished since %s", time.UnixMicro(r.created).UTC().Format(time.RFC3339))})
		}
	}
	rank := map[string]int{Missing: 0, Duplicate: 1, Differ: 2, Phantom: 3, DeadInKafka: 4, OrderBroken: 5, Foreign: 6, NotDeleted: 7, StaleUnpublished: 8, OutOfOrder: 9}
	slices.SortStableFunc(v.findings, func(a, b Finding) int {
		if d := rank[a.Kind] - rank[b.Kind]; d != 0 {
			return d
		}
		return cmpInt(a.ID, b.ID)
	})
	v.rep.Findings = v.findings[:min(len(v.findings), v.cfg.Limit)]
	if v.rep.Findings == nil {
		v.rep.Findings = []Finding{}
	}
}

// WriteText writes the report for people: one summary line of counts, then
// the first findings, one per line.
func (r *Report) WriteText(w io.Writer) error {
	verdict := "CLEAN"
	if !r.Clean() {
		verdict = "DISCREPANCIES"
	}
	window := fmt.Sprintf("ids %d..%d", r.FromID, r.ToID)
	if !r.Since.IsZero() {
		window += " (rows created since " + r.Since.UTC().Format(time.RFC3339) + ")"
	}
	_, err := fmt.Fprintf(w, "verify %s %s: %s rows=%d published=%d unpublished=%d dead_lettered=%d records=%d missing=%d duplicate=%d differ=%d phantom=%d dead_letter_in_kafka=%d order_broken=%d foreign=%d stale_unpublished=%d out_of_order=%d (warning) in %s\n",
		r.Table, window, verdict, r.Rows, r.Published, r.Unpublished, r.DeadLettered, r.Records,
		r.Counts[Missing], r.Counts[Duplicate], r.Counts[Differ], r.Counts[Phantom], r.Counts[DeadInKafka], r.Counts[OrderBroken], r.Foreign, r.Counts[StaleUnpublished], r.Counts[OutOfOrder],
		r.Elapsed.Round(time.Millisecond))
	if err == nil && r.Counts[Foreign] == 0 && r.Foreign > 0 {
		_, err = fmt.Fprintf(w, "foreign records accepted (-allow-foreign): %d records without a valid outbox-id header\n", r.Foreign)
	}
	if err == nil && r.InvalidTopic > 0 {
		_, err = fmt.Fprintf(w, "invalid_topic=%d: rows whose topic is no Kafka topic name (such as ''): no record can hold them; the relay dead-letters them\n", r.InvalidTopic)
	}
	if err == nil && r.Counts[OutOfOrder] > 0 {
		_, err = fmt.Fprintf(w, "out_of_order: verify cannot tell these from a late commit (see the README)\n")
	}
	if err == nil && r.OnPublish == string(outbox.Delete) {
		_, err = fmt.Fprintf(w, "on-publish=delete: deleted=%d published_not_deleted=%d. %d records hold rows published and deleted: their content cannot be compared with the table, "+
			"a record of no row cannot be told from them (no phantom check), and a row deleted without being published cannot be found (no missing check); "+
			"checked: duplicates, key order, dead letters in Kafka, and the rows still in the table\n", r.Deleted, r.Counts[NotDeleted], r.Deleted)
	}
	for _, f := range r.Findings {
		if err != nil {
			break
		}
		_, err = fmt.Fprintf(w, "%s id=%d topic=%s partition=%d offsets=%v: %s\n", f.Kind, f.ID, f.Topic, f.Partition, f.Offsets, f.Detail)
	}
	return err
}
