package inbox

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand/v2"
	"runtime/debug"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/tracing"
)

// applyPartition applies recs, records of one partition in offset order
// that were fetched while this instance held the partition at epoch. It
// returns nil when every record is settled (applied, skipped or
// dead-lettered), when the partition was fenced, or when ctx ended (the
// rest is fetched again by whoever holds the partition next); a
// crashError when a failpoint stopped it.
//
// Database operations run on work, which outlives ctx by the shutdown
// timeout, so that a transaction in flight finishes; waits end with ctx.
func (i *Inbox) applyPartition(ctx, work context.Context, key partitionKey, epoch int64, recs []*kgo.Record) error {
	limit := i.cfg.BatchSize
	var (
		retryFirst error // recs[0] failed in an earlier batch: retry it alone
		pending    error // the record at index limit failed: retry it once the records before it are in
		infra      int   // database failures in a row
	)
	for len(recs) > 0 {
		if ctx.Err() != nil {
			return nil
		}
		if retryFirst != nil {
			err := i.retryAlone(ctx, work, key, epoch, recs[0], retryFirst)
			retryFirst = nil
			if err != nil {
				return i.stopPartition(key, epoch, err)
			}
			if ctx.Err() != nil {
				return nil
			}
			recs = recs[1:]
			continue
		}
		n := min(len(recs), limit)
		res, err := i.applyBatch(work, key, epoch, recs[:n], 1)
		switch {
		case err == nil && res.failed < 0:
			recs = recs[n:]
			limit, infra = i.cfg.BatchSize, 0
			retryFirst, pending = pending, nil
		case err == nil && res.failed == 0:
			retryFirst, pending = res.handlerErr, nil
			limit, infra = i.cfg.BatchSize, 0
		case err == nil:
			// Apply the records before the failing one first, then
			// retry it alone.
			limit, pending, infra = res.failed, res.handlerErr, 0
		case errors.Is(err, ErrFenced), isCrash(err):
			return i.stopPartition(key, epoch, err)
		default:
			infra++
			i.m.dbErrors.Inc()
			i.log.Warn("inbox: database error, retrying the batch", "topic", key.topic, "partition", key.partition,
				"first_offset", recs[0].Offset, "records", n, "failures", infra, "err", err)
			if !i.sleep(ctx, i.backoff(infra)) {
				return nil
			}
		}
	}
	return nil
}

// stopPartition handles the errors that end work on a partition: the fence
// (the records are dropped: the partition's current owner applies them) and
// a failpoint's crash.
func (i *Inbox) stopPartition(key partitionKey, epoch int64, err error) error {
	if errors.Is(err, ErrFenced) {
		i.fenced.Add(1)
		i.m.fenced.Inc()
		i.release(key, epoch)
		i.log.Warn("inbox: partition fenced: it was assigned again; dropping the records fetched before", "topic", key.topic,
			"partition", key.partition, "epoch", epoch)
		return nil
	}
	return err
}

func isCrash(err error) bool {
	var c crashError
	return errors.As(err, &c)
}

// retryAlone retries rec, whose handler failed once with first, in
// transactions of its own under the retry policy, and dead-letters it when
// the attempts are exhausted or the handler calls the error permanent. It
// returns ErrFenced or a crashError, or nil (settled, or ctx ended).
func (i *Inbox) retryAlone(ctx, work context.Context, key partitionKey, epoch int64, rec *kgo.Record, first error) error {
	attempts, last := 1, first
	for attempts < i.cfg.MaxAttempts && !IsPermanent(last) {
		if !i.sleep(ctx, i.backoff(attempts)) {
			return nil
		}
		res, err := i.applyBatch(work, key, epoch, []*kgo.Record{rec}, attempts+1)
		switch {
		case errors.Is(err, ErrFenced), isCrash(err):
			return err
		case err != nil:
			// Not the handler's fault: not an attempt.
			i.m.dbErrors.Inc()
			i.log.Warn("inbox: database error while retrying an event", "topic", key.topic, "partition", key.partition, "offset", rec.Offset, "err", err)
			continue
		case res.failed < 0:
			return nil
		}
		attempts++
		last = res.handlerErr
	}
	for failures := 1; ; failures++ {
		err := i.deadLetter(work, key, epoch, rec, last, attempts)
		if err == nil || errors.Is(err, ErrFenced) || isCrash(err) {
			return err
		}
		i.m.dbErrors.Inc()
		i.log.Warn("inbox: database error while dead-lettering an event, retrying", "topic", key.topic, "partition", key.partition, "offset", rec.Offset, "err", err)
		if !i.sleep(ctx, i.backoff(failures)) {
			return nil
		}
	}
}

// backoff is the wait before retry n (1, 2, ...): RetryBackoff doubled n-1
// times, capped, with up to 20% jitter.
func (i *Inbox) backoff(n int) time.Duration {
	d := i.cfg.RetryBackoff
	for k := 1; k < n && d < i.cfg.MaxRetryBackoff; k++ {
		d *= 2
	}
	d = min(d, i.cfg.MaxRetryBackoff)
	if d > 0 {
		d += rand.N(d/5 + 1)
	}
	return d
}

// sleep waits d; false when ctx ended first.
func (i *Inbox) sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// batchResult says which record's handler failed: failed is its index in
// the batch, -1 when the batch committed.
type batchResult struct {
	failed     int
	handlerErr error
}

// lockPartition is step 2 of the hand-over (see Run): it locks the
// partition's offsets row for the rest of tx and returns the stored next
// offset, or ErrFenced when the row's epoch is not epoch, the epoch this
// instance got with the records.
func (i *Inbox) lockPartition(ctx context.Context, tx pgx.Tx, key partitionKey, epoch int64) (int64, error) {
	var next, current int64
	err := tx.QueryRow(ctx, `SELECT next_offset, epoch FROM `+i.t.offsets+`
WHERE consumer_group = $1 AND topic = $2 AND partition = $3 FOR UPDATE`, i.cfg.Group, key.topic, key.partition).Scan(&next, &current)
	if errors.Is(err, pgx.ErrNoRows) {
		return 0, fmt.Errorf("%w (the offsets row of %s partition %d is gone)", ErrFenced, key.topic, key.partition)
	}
	if err != nil {
		return 0, fmt.Errorf("lock the offsets of %s partition %d: %w", key.topic, key.partition, err)
	}
	if current != epoch {
		return 0, fmt.Errorf("%w (%s partition %d: epoch %d in the database, %d held)", ErrFenced, key.topic, key.partition, current, epoch)
	}
	return next, nil
}

func (i *Inbox) failpoint(ctx context.Context, name string, key partitionKey, batch []*kgo.Record) error {
	if i.fail == nil {
		return nil
	}
	offs := make([]int64, len(batch))
	for n, r := range batch {
		offs[n] = r.Offset
	}
	if err := i.fail(ctx, name, key.topic, key.partition, offs); err != nil {
		return crashError{err}
	}
	return nil
}

// applyBatch applies batch (records of one partition, in offset order) in
// one transaction: lock and check the fence, skip what is below the stored
// offset, dead-letter records without a valid outbox-id, record the others
// as applied (the ones already recorded are duplicates, skipped), run the
// handler on each new one, move the offset past the batch, commit. attempt
// is passed to the handler in Event.Attempt.
//
// A handler error rolls all of it back and is returned in the result with
// the failing record's index; an error is a database failure (retry),
// ErrFenced, or a crashError.
func (i *Inbox) applyBatch(ctx context.Context, key partitionKey, epoch int64, batch []*kgo.Record, attempt int) (batchResult, error) {
	ok := batchResult{failed: -1}
	if err := i.failpoint(ctx, FailBeforeApply, key, batch); err != nil {
		return ok, err
	}
	began := time.Now()
	tx, err := i.db.Begin(ctx)
	if err != nil {
		return ok, fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	next, err := i.lockPartition(ctx, tx, key, epoch)
	if err != nil {
		return ok, err
	}

	// Records below the stored offset were applied (or dead-lettered)
	// already: a redelivery.
	skip := 0
	for skip < len(batch) && batch[skip].Offset < next {
		skip++
	}
	todo := batch[skip:]
	if len(todo) == 0 {
		i.redelivered.Add(int64(skip))
		i.m.redelivered.Add(float64(skip))
		return ok, nil
	}

	// Each record's dedupe key: its event id when it has one (relay
	// schema version 7 and later), else its outbox-id (older records).
	ids := make([]int64, len(todo)) // 0: poison (no valid outbox-id or event id)
	evs := make([]string, len(todo))
	var (
		insIDs, insOffsets []int64
		evIDs, evOffsets   []int64
		evKeys             []string
		invalid            []*kgo.Record
		invalidWhy         []string
		invalidIDs         []int64 // the outbox-id of an invalid record, 0 when it has none
		seen               = make(map[dedupeKey]bool, len(todo))
	)
	for n, r := range todo {
		id, valid := outboxID(r)
		if !valid {
			invalid = append(invalid, r)
			invalidWhy = append(invalidWhy, "no valid "+HeaderOutboxID+" header: the record did not come from outbox-relay, or was altered")
			invalidIDs = append(invalidIDs, 0)
			continue
		}
		ev, evValid := eventID(r)
		if !evValid {
			invalid = append(invalid, r)
			invalidWhy = append(invalidWhy, "header "+HeaderEventID+" is not a UUID: the record did not come from outbox-relay, or was altered")
			invalidIDs = append(invalidIDs, id)
			continue
		}
		ids[n], evs[n] = id, ev
		k := dedupeKey{id: id, event: ev}
		if ev != "" {
			k.id = 0
		}
		if seen[k] {
			continue
		}
		seen[k] = true
		if ev != "" {
			evIDs, evKeys, evOffsets = append(evIDs, id), append(evKeys, ev), append(evOffsets, r.Offset)
		} else {
			insIDs, insOffsets = append(insIDs, id), append(insOffsets, r.Offset)
		}
	}
	fresh := make(map[dedupeKey]bool, len(insIDs)+len(evIDs))
	if len(insIDs) > 0 {
		rows, err := tx.Query(ctx, `INSERT INTO `+i.t.applied+` (topic, outbox_id, consumer_group, partition, kafka_offset)
SELECT $1, id, $2, $3, o FROM unnest($4::bigint[], $5::bigint[]) AS u(id, o)
ON CONFLICT (topic, outbox_id) WHERE event_id IS NULL DO NOTHING
RETURNING outbox_id`, key.topic, i.cfg.Group, key.partition, insIDs, insOffsets)
		if err != nil {
			return ok, fmt.Errorf("record applied events: %w", err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[int64])
		if err != nil {
			return ok, fmt.Errorf("record applied events: %w", err)
		}
		for _, id := range got {
			fresh[dedupeKey{id: id}] = true
		}
	}
	if len(evIDs) > 0 {
		rows, err := tx.Query(ctx, `INSERT INTO `+i.t.applied+` (topic, outbox_id, event_id, consumer_group, partition, kafka_offset)
SELECT $1, id, ev::uuid, $2, $3, o FROM unnest($4::bigint[], $5::text[], $6::bigint[]) AS u(id, ev, o)
ON CONFLICT (topic, event_id) WHERE event_id IS NOT NULL DO NOTHING
RETURNING event_id::text`, key.topic, i.cfg.Group, key.partition, evIDs, evKeys, evOffsets)
		if err != nil {
			return ok, fmt.Errorf("record applied events: %w", err)
		}
		got, err := pgx.CollectRows(rows, pgx.RowTo[string])
		if err != nil {
			return ok, fmt.Errorf("record applied events: %w", err)
		}
		for _, ev := range got {
			fresh[dedupeKey{event: ev}] = true
		}
	}
	for n, r := range invalid {
		if err := i.insertDeadLetter(ctx, tx, key, r, invalidIDs[n], invalidWhy[n], 0); err != nil {
			return ok, err
		}
	}

	applied, duplicates := 0, 0
	for n, r := range todo {
		id := ids[n]
		if id == 0 {
			continue
		}
		k := dedupeKey{id: id}
		if evs[n] != "" {
			k = dedupeKey{event: evs[n]}
		}
		if !fresh[k] {
			duplicates++
			continue
		}
		delete(fresh, k) // a second record of the key in this batch is a duplicate
		ev := eventOf(r, id, attempt)
		if err := i.callHandler(ctx, tx, ev); err != nil {
			if ctx.Err() != nil || tx.Conn().IsClosed() {
				return ok, fmt.Errorf("handler of %s partition %d offset %d (the transaction's connection is gone, not counted as an attempt): %w",
					key.topic, key.partition, r.Offset, err)
			}
			if transient(err) {
				return ok, fmt.Errorf("handler of %s partition %d offset %d (a transient database error, not counted as an attempt): %w",
					key.topic, key.partition, r.Offset, err)
			}
			i.handlerErrs.Add(1)
			i.m.handlerErrors.Inc()
			i.log.Debug("inbox: handler failed; rolled back", "topic", key.topic, "partition", key.partition, "offset", r.Offset,
				"outbox_id", id, "attempt", attempt, "err", err)
			return batchResult{failed: skip + n, handlerErr: err}, nil
		}
		applied++
	}

	last := todo[len(todo)-1].Offset
	if _, err := tx.Exec(ctx, `UPDATE `+i.t.offsets+` SET next_offset = $4, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3`, i.cfg.Group, key.topic, key.partition, last+1); err != nil {
		return ok, fmt.Errorf("move the offset: %w", err)
	}
	if err := i.failpoint(ctx, FailBeforeCommit, key, batch); err != nil {
		return ok, err
	}
	if err := tx.Commit(ctx); err != nil {
		// The outcome may be unknown (a connection lost during COMMIT);
		// the retry finds out: what committed is below the stored offset.
		return ok, fmt.Errorf("commit: %w", err)
	}
	if err := i.failpoint(ctx, FailAfterCommit, key, batch); err != nil {
		return ok, err
	}
	i.m.txnDuration.Observe(time.Since(began).Seconds())
	i.applied.Add(int64(applied))
	i.m.applied.Add(float64(applied))
	i.duplicates.Add(int64(duplicates))
	i.m.duplicates.Add(float64(duplicates))
	i.redelivered.Add(int64(skip))
	i.m.redelivered.Add(float64(skip))
	if len(invalid) > 0 {
		i.deadLettered.Add(int64(len(invalid)))
		i.m.deadLetters.WithLabelValues("no_outbox_id").Add(float64(len(invalid)))
		i.log.Warn("inbox: records without a valid outbox-id or event id moved to the dead-letter table", "topic", key.topic,
			"partition", key.partition, "offsets", offsetsOf(invalid), "table", i.t.deadLetter)
	}
	i.markCommit(key, epoch, batch[len(batch)-1])
	return ok, nil
}

// deadLetter moves rec, which the handler could not apply, to the
// dead-letter table, in a transaction that moves the offset past it.
func (i *Inbox) deadLetter(ctx context.Context, key partitionKey, epoch int64, rec *kgo.Record, cause error, attempts int) error {
	tx, err := i.db.Begin(ctx)
	if err != nil {
		return fmt.Errorf("begin: %w", err)
	}
	defer tx.Rollback(context.WithoutCancel(ctx)) //nolint:errcheck // a no-op after commit
	next, err := i.lockPartition(ctx, tx, key, epoch)
	if err != nil {
		return err
	}
	if rec.Offset < next {
		return nil // settled meanwhile
	}
	id, _ := outboxID(rec)
	if err := i.insertDeadLetter(ctx, tx, key, rec, id, cause.Error(), attempts); err != nil {
		return err
	}
	if _, err := tx.Exec(ctx, `UPDATE `+i.t.offsets+` SET next_offset = $4, updated_at = now()
WHERE consumer_group = $1 AND topic = $2 AND partition = $3`, i.cfg.Group, key.topic, key.partition, rec.Offset+1); err != nil {
		return fmt.Errorf("move the offset: %w", err)
	}
	if err := tx.Commit(ctx); err != nil {
		return fmt.Errorf("commit: %w", err)
	}
	reason := "handler"
	if IsPermanent(cause) {
		reason = "permanent"
	}
	i.deadLettered.Add(1)
	i.m.deadLetters.WithLabelValues(reason).Inc()
	i.log.Error("inbox: event moved to the dead-letter table", "topic", key.topic, "partition", key.partition, "offset", rec.Offset,
		"outbox_id", id, "attempts", attempts, "err", cause, "table", i.t.deadLetter)
	i.markCommit(key, epoch, rec)
	return nil
}

func (i *Inbox) insertDeadLetter(ctx context.Context, tx pgx.Tx, key partitionKey, r *kgo.Record, id int64, cause string, attempts int) error {
	var outboxID *int64
	if id > 0 {
		outboxID = &id
	}
	var ts *time.Time
	if !r.Timestamp.IsZero() {
		ts = &r.Timestamp
	}
	_, err := tx.Exec(ctx, `INSERT INTO `+i.t.deadLetter+`
(consumer_group, topic, partition, kafka_offset, outbox_id, key, value, headers, record_time, error, attempts, event_id)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::uuid)
ON CONFLICT (consumer_group, topic, partition, kafka_offset) DO NOTHING`,
		i.cfg.Group, key.topic, key.partition, r.Offset, outboxID, r.Key, r.Value, headersJSON(r.Headers), ts, cause, attempts, eventIDArg(r))
	if err != nil {
		return fmt.Errorf("insert into %s: %w", i.t.deadLetter, err)
	}
	return nil
}

// eventIDArg is the record's event id for a uuid column: nil when it has
// none or an invalid one.
func eventIDArg(r *kgo.Record) any {
	if ev, ok := eventID(r); ok && ev != "" {
		return ev
	}
	return nil
}

// markCommit marks rec for the courtesy commit of Kafka's group offsets,
// if this instance still holds its partition at epoch.
func (i *Inbox) markCommit(key partitionKey, epoch int64, rec *kgo.Record) {
	if e, ok := i.epochOf(key); !ok || e != epoch {
		return
	}
	if cl := i.client.Load(); cl != nil {
		cl.MarkCommitRecords(rec)
	}
}

// callHandler runs the handler, turning a panic into an error, inside the
// event's span when tracing is on (handlerSpan).
func (i *Inbox) callHandler(ctx context.Context, tx pgx.Tx, ev *Event) (err error) {
	if i.tracer != nil {
		var span trace.Span
		ctx, span = i.handlerSpan(ctx, ev)
		defer func() {
			if err != nil {
				span.RecordError(err)
				span.SetStatus(codes.Error, err.Error())
			}
			span.End()
		}()
	}
	defer func() {
		if p := recover(); p != nil {
			err = fmt.Errorf("handler panicked: %v\n%s", p, debug.Stack())
		}
	}()
	return i.handle(ctx, tx, ev)
}

// handlerSpan starts the consumer span of one handler call: a child of the
// span context in the record's traceparent header (the writer's), so that
// the writer's trace goes on in the consumer, or a new root without one.
func (i *Inbox) handlerSpan(ctx context.Context, ev *Event) (context.Context, trace.Span) {
	opts := []trace.SpanStartOption{
		trace.WithSpanKind(trace.SpanKindConsumer),
		trace.WithAttributes(
			attribute.String("messaging.system", "kafka"),
			attribute.String("messaging.operation.type", "process"),
			attribute.String("messaging.destination.name", ev.Topic),
			attribute.String("messaging.consumer.group.name", i.cfg.Group),
			attribute.Int("messaging.destination.partition.id", int(ev.Partition)),
			attribute.Int64("messaging.kafka.offset", ev.Offset),
			attribute.Int64("outbox.id", ev.OutboxID),
			attribute.String("outbox.event_id", ev.EventID),
			attribute.Int("outbox.attempt", ev.Attempt),
		),
	}
	if sc := tracing.SpanContext(ev.Headers); sc.IsValid() {
		ctx = trace.ContextWithRemoteSpanContext(ctx, sc)
	} else {
		opts = append(opts, trace.WithNewRoot())
	}
	return i.tracer.Start(ctx, "process "+ev.Topic, opts...)
}

// transient reports whether err is a database error that says nothing
// about the event: a deadlock, a serialization failure, a lock timeout.
// The batch is retried without counting an attempt, so that contention
// never dead-letters an event.
func transient(err error) bool {
	var pg *pgconn.PgError
	if !errors.As(err, &pg) {
		return false
	}
	switch pg.Code {
	case "40001", "40P01", "55P03": // serialization_failure, deadlock_detected, lock_not_available
		return true
	}
	return false
}

// dedupeKey is what the inbox deduplicates a record by, within its topic:
// its event id when it has one, else (a record from before the relay's
// migration 7) its outbox-id.
type dedupeKey struct {
	id    int64  // 0 when event is set
	event string // lower-case UUID text, as PostgreSQL prints it
}

// eventID reads the record's outbox-event-id header: "" and valid when
// there is none (an older record), the UUID in lower case when it is one,
// invalid otherwise.
func eventID(r *kgo.Record) (string, bool) {
	for _, h := range r.Headers {
		if h.Key == HeaderEventID {
			v := strings.ToLower(string(h.Value))
			return v, validUUID(v)
		}
	}
	return "", true
}

// validUUID reports whether s is a UUID in PostgreSQL's printed form
// (8-4-4-4-12 lower-case hexadecimal digits).
func validUUID(s string) bool {
	if len(s) != 36 {
		return false
	}
	for i := 0; i < len(s); i++ {
		c := s[i]
		switch i {
		case 8, 13, 18, 23:
			if c != '-' {
				return false
			}
		default:
			if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'f') {
				return false
			}
		}
	}
	return true
}

// outboxID parses the record's outbox-id header: a positive decimal.
func outboxID(r *kgo.Record) (int64, bool) {
	for _, h := range r.Headers {
		if h.Key == HeaderOutboxID {
			id, err := strconv.ParseInt(string(h.Value), 10, 64)
			return id, err == nil && id > 0
		}
	}
	return 0, false
}

func eventOf(r *kgo.Record, id int64, attempt int) *Event {
	ev, _ := eventID(r)
	return &Event{OutboxID: id, EventID: ev, Topic: r.Topic, Partition: r.Partition, Offset: r.Offset, Key: r.Key, Value: r.Value,
		Headers: r.Headers, Timestamp: r.Timestamp, Attempt: attempt}
}

// headersJSON renders record headers for the dead-letter table: a JSON
// array of {"key", "value"}, or {"key", "base64"} for a value that is not
// UTF-8; nil for none.
func headersJSON(hs []kgo.RecordHeader) []byte {
	if len(hs) == 0 {
		return nil
	}
	out := make([]map[string]string, len(hs))
	for n, h := range hs {
		if utf8.Valid(h.Value) {
			out[n] = map[string]string{"key": h.Key, "value": string(h.Value)}
		} else {
			out[n] = map[string]string{"key": h.Key, "base64": base64.StdEncoding.EncodeToString(h.Value)}
		}
	}
	b, _ := json.Marshal(out)
	return b
}

func offsetsOf(rs []*kgo.Record) []int64 {
	out := make([]int64, len(rs))
	for n, r := range rs {
		out[n] = r.Offset
	}
	return out
}
