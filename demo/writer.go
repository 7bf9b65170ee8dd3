package demo

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
)

const (
	// Topic is the Kafka topic of the payment events.
	Topic = "payments"
	// OpeningBalance is every account's balance at the start, in cents.
	OpeningBalance = 100_000
)

// setupSchema drops and creates schema with an accounts table of n accounts
// and a migrated outbox table. It touches nothing outside schema.
func setupSchema(ctx context.Context, pool *pgxpool.Pool, schema string, n int) error {
	s := migrations.QuoteIdent(schema)
	stmt := `DROP SCHEMA IF EXISTS ` + s + ` CASCADE;
CREATE SCHEMA ` + s + `;
CREATE TABLE ` + s + `.accounts (
    id      integer PRIMARY KEY,
    balance bigint  NOT NULL,
    seq     bigint  NOT NULL DEFAULT 0  -- transfers debited so far; the event's seq
)`
	if _, err := pool.Exec(ctx, stmt); err != nil {
		return fmt.Errorf("create schema %s: %w", schema, err)
	}
	if _, err := pool.Exec(ctx, `INSERT INTO `+s+`.accounts (id, balance) SELECT g, $2 FROM generate_series(1, $1::int) g`, n, OpeningBalance); err != nil {
		return fmt.Errorf("create %d accounts in %s: %w", n, schema, err)
	}
	m, err := migrations.New(pool, schema, "outbox")
	if err != nil {
		return err
	}
	if _, err := m.Up(ctx); err != nil {
		return fmt.Errorf("migrate %s.outbox: %w", schema, err)
	}
	return nil
}

// simulator is the payments application: each transfer is one database
// transaction that moves money between two accounts and writes one outbox
// row about it.
type simulator struct {
	pool     *pgxpool.Pool
	accounts string // quoted, schema-qualified
	table    outbox.Table
	n        int   // accounts
	events   int64 // stop after this many transfers; 0: never
	limit    *limiter
	check    *checker
	claimed  atomic.Int64
	quit     chan struct{}
	quitOnce sync.Once
}

// run runs writers writers until stop is called, s.events transfers are
// written, or a writer fails; it returns the first error.
func (s *simulator) run(writers int) error {
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
	)
	for range writers {
		wg.Go(func() {
			if err := s.writer(); err != nil {
				mu.Lock()
				if first == nil {
					first = err
				}
				mu.Unlock()
				s.stop()
			}
		})
	}
	wg.Wait()
	return first
}

// stop makes the writers stop after the transfer each is running.
func (s *simulator) stop() { s.quitOnce.Do(func() { close(s.quit) }) }

func (s *simulator) writer() error {
	for {
		select {
		case <-s.quit:
			return nil
		default:
		}
		if !s.limit.wait(s.quit) {
			return nil
		}
		id := s.claimed.Add(1)
		if s.events > 0 && id > s.events {
			return nil
		}
		from := 1 + rand.IntN(s.n)
		to := 1 + rand.IntN(s.n-1)
		if to >= from {
			to++
		}
		if err := s.transfer(id, from, to, 1+rand.Int64N(1000)); err != nil {
			return fmt.Errorf("transfer %d: %w", id, err)
		}
		s.check.committed(id, time.Now())
	}
}

// transfer runs one transfer. It is not cancelled by Ctrl-C: a transfer
// that started commits, so its outcome is never in doubt.
func (s *simulator) transfer(id int64, from, to int, amount int64) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	tx, err := s.pool.Begin(ctx)
	if err != nil {
		return err
	}
	defer tx.Rollback(ctx) //nolint:errcheck // a no-op after Commit

	// Both rows locked in id order, so two transfers between the same
	// accounts in opposite directions cannot deadlock. The lock on the
	// debited account also orders its outbox rows: the next transfer from
	// it inserts its row only after this one committed, so the row ids of
	// one key grow in commit order, which is the order the relay publishes.
	rows, err := tx.Query(ctx, `SELECT id, seq FROM `+s.accounts+` WHERE id = ANY($1) ORDER BY id FOR UPDATE`, []int32{int32(from), int32(to)})
	if err != nil {
		return err
	}
	var seq int64 = -1
	for rows.Next() {
		var acct int32
		var sq int64
		if err := rows.Scan(&acct, &sq); err != nil {
			rows.Close()
			return err
		}
		if int(acct) == from {
			seq = sq + 1
		}
	}
	if err := rows.Err(); err != nil {
		return err
	}
	if seq < 0 {
		return fmt.Errorf("account %d does not exist", from)
	}
	if _, err := tx.Exec(ctx, `UPDATE `+s.accounts+`
SET balance = balance + CASE WHEN id = $1 THEN -$3::bigint ELSE $3::bigint END,
    seq     = seq + CASE WHEN id = $1 THEN 1 ELSE 0 END
WHERE id IN ($1, $2)`, from, to, amount); err != nil {
		return err
	}
	value, err := json.Marshal(Transfer{TransferID: id, From: from, To: to, Amount: amount, Seq: seq})
	if err != nil {
		return err
	}
	err = s.table.Write(ctx, tx, outbox.Message{
		Topic:   Topic,
		Key:     []byte(strconv.Itoa(from)),
		Value:   value,
		Headers: map[string]string{"type": "transfer"},
	})
	if err != nil {
		return err
	}
	return tx.Commit(ctx)
}

// balanceTotal is the sum of all balances; transfers never change it.
func balanceTotal(ctx context.Context, db interface {
	QueryRow(context.Context, string, ...any) pgx.Row
}, accounts string) (int64, error) {
	var total int64
	err := db.QueryRow(ctx, `SELECT coalesce(sum(balance), 0)::bigint FROM `+accounts).Scan(&total)
	return total, err
}

// limiter spaces calls evenly at a rate shared by all writers; nil means
// no limit.
type limiter struct {
	mu    sync.Mutex
	every time.Duration
	next  time.Time
}

func newLimiter(perSecond int) *limiter {
	if perSecond <= 0 {
		return nil
	}
	return &limiter{every: time.Second / time.Duration(perSecond)}
}

// wait blocks until the caller's turn; false when stop closed first.
func (l *limiter) wait(stop <-chan struct{}) bool {
	if l == nil {
		return true
	}
	l.mu.Lock()
	// A writer a little late keeps its slot (timers overshoot); after a
	// longer stall the schedule restarts from now, without a burst.
	if now := time.Now(); l.next.Before(now.Add(-50 * time.Millisecond)) {
		l.next = now
	}
	at := l.next
	l.next = l.next.Add(l.every)
	l.mu.Unlock()
	d := time.Until(at)
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-stop:
		return false
	case <-t.C:
		return true
	}
}
