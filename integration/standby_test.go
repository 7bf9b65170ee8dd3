package integration

import (
	"context"
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/migrations"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// failover is a private primary with one physical streaming standby, an
// outbox table on the primary, and a topic.
type failover struct {
	primary *testenv.PrivatePostgres
	standby *testenv.Standby
	k       *testenv.Kafka
	topic   string
}

// newFailover starts the primary and its standby stb1; synchronous makes
// stb1 a synchronous standby (synchronous_standby_names).
func newFailover(t *testing.T, synchronous bool) *failover {
	t.Helper()
	f := &failover{primary: testenv.StartPrivatePostgres(t)}
	pool := privatePool(t, f.primary.URL("postgres", "postgres"))
	m, err := migrations.New(pool, "public", "outbox")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Up(context.Background()); err != nil {
		t.Fatal(err)
	}
	f.standby = f.primary.StartStandby(t, "stb1")
	if synchronous {
		for _, q := range []string{`ALTER SYSTEM SET synchronous_standby_names = 'stb1'`, `SELECT pg_reload_conf()`} {
			if _, err := pool.Exec(context.Background(), q); err != nil {
				t.Fatal(err)
			}
		}
	}
	pool.Close()
	f.topic = testenv.RandomName("payments-")
	f.k = testenv.NewKafka(t, 3, f.topic)
	return f
}

func privatePool(t *testing.T, url string) *pgxpool.Pool {
	t.Helper()
	pool, err := pgxpool.New(context.Background(), url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pool.Close)
	return pool
}

// db is the outbox of server pg, for the test helpers and the relay.
func (f *failover) db(t *testing.T, pg *testenv.PrivatePostgres) *testenv.DB {
	url := pg.URL("postgres", "postgres")
	return &testenv.DB{URL: url, Pool: privatePool(t, url), Table: outbox.DefaultTable}
}

// writers insert one row at a time at about rate rows/s with the given
// synchronous_commit until stopped or the server is gone. Every value is
// unique, so a row that reuses an id of another is told apart.
type writers struct {
	stop    chan struct{}
	done    sync.WaitGroup
	written atomic.Int64
}

func (f *failover) startWriters(t *testing.T, pg *testenv.PrivatePostgres, rate int, syncCommit string) *writers {
	t.Helper()
	url := pg.URL("postgres", "postgres") + "?options=-c%20synchronous_commit%3D" + syncCommit
	pool := privatePool(t, url)
	w := &writers{stop: make(chan struct{})}
	tag := testenv.RandomName("w")
	w.done.Add(1)
	go func() {
		defer w.done.Done()
		tick := time.NewTicker(time.Second / time.Duration(rate))
		defer tick.Stop()
		for i := 0; ; i++ {
			select {
			case <-w.stop:
				return
			case <-tick.C:
			}
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			_, err := pool.Exec(ctx, `INSERT INTO outbox (topic, key, value) VALUES ($1, $2, $3)`,
				f.topic, []byte(fmt.Sprintf("k%d", i%17)), []byte(fmt.Sprintf("%s-%d", tag, i)))
			cancel()
			if err == nil {
				w.written.Add(1)
			}
		}
	}()
	return w
}

func (w *writers) Stop() {
	select {
	case <-w.stop:
	default:
		close(w.stop)
	}
	w.done.Wait()
}

// audit compares what Kafka holds with the promoted database: phantoms are
// records whose row the database does not have (no row of that id, or one
// with another value); duplicates are rows published more than once;
// missing are rows of the database never published.
type audit struct {
	records, rows int
	phantoms      []int64
	duplicates    []int64
	missing       []int64
}

func (f *failover) audit(t *testing.T, db *testenv.DB) audit {
	t.Helper()
	ctx := context.Background()
	type row struct{ value string }
	have := map[int64]string{}
	rows, err := db.Pool.Query(ctx, `SELECT id, value FROM outbox WHERE topic = $1`, f.topic)
	if err != nil {
		t.Fatal(err)
	}
	for rows.Next() {
		var id int64
		var v []byte
		if err := rows.Scan(&id, &v); err != nil {
			t.Fatal(err)
		}
		have[id] = string(v)
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	seen := f.k.NewConsumer(t, f.topic).WaitFor(t, len(have), 30*time.Second)
	a := audit{records: len(seen), rows: len(have)}
	published := map[int64]int{}
	for _, s := range seen {
		if v, ok := have[s.ID]; !ok || v != string(s.Value) {
			a.phantoms = append(a.phantoms, s.ID)
			continue
		}
		published[s.ID]++
		if published[s.ID] == 2 {
			a.duplicates = append(a.duplicates, s.ID)
		}
	}
	for id := range have {
		if published[id] == 0 {
			a.missing = append(a.missing, id)
		}
	}
	return a
}

func (a audit) String() string {
	return fmt.Sprintf("%d records for %d rows: %d phantoms %v, %d duplicates %v, %d missing %v",
		a.records, a.rows, len(a.phantoms), firstIDs(a.phantoms), len(a.duplicates), firstIDs(a.duplicates), len(a.missing), firstIDs(a.missing))
}

func firstIDs(ids []int64) []int64 {
	if len(ids) > 10 {
		return ids[:10]
	}
	return ids
}

// failOver stalls the standby, lets the primary run on alone for a while,
// crashes it, and promotes the standby with what it had flushed: its WAL
// receiver dies with what it had not (the network's buffers too).
func (f *failover) failOver(t *testing.T, w *writers, alone time.Duration, old *testenv.Running) {
	t.Helper()
	if f.standby.Stalled() == 0 {
		f.standby.Stall()
	}
	time.Sleep(alone)
	f.primary.Crash()
	w.Stop()
	_ = old.Stop()
	f.standby.Cut()
	f.standby.Promote()
}

// lag runs the writers for d while the standby falls behind now and then.
func (f *failover) lag(d time.Duration) {
	end := time.Now().Add(d)
	for time.Now().Before(end) {
		f.standby.Stall()
		time.Sleep(400 * time.Millisecond)
		f.standby.Resume()
		time.Sleep(300 * time.Millisecond)
	}
}

// afterPromotion runs a relay on the promoted standby, writes new rows
// there (which may reuse ids of rows the standby never had) and waits
// until every row of the promoted database is published.
func (f *failover) afterPromotion(t *testing.T, cfg relay.Config, log *testenv.SyncBuffer) *testenv.DB {
	t.Helper()
	db := f.db(t, f.standby.PrivatePostgres)
	cfg.DatabaseURL = db.URL
	cfg.StandbyNames = nil // the promoted server has no standby of its own
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, log)))
	w := f.startWriters(t, f.standby.PrivatePostgres, 200, "on")
	time.Sleep(time.Second)
	w.Stop()
	faultsEventually(t, 60*time.Second, "every row of the promoted database is published", func() bool { return db.Unpublished(t) == 0 })
	return db
}

// TestStandbyNamesKeepPhantomsOutOfKafkaThroughAnAsyncFailover: writers at
// 300 rows/s, an asynchronous standby that falls behind now and then, the
// primary crashes while the standby is 1.5 s behind, the standby is
// promoted. With OUTBOX_STANDBY_NAMES naming it, Kafka holds only rows the
// promoted database has, each once, and every row of it.
func TestStandbyNamesKeepPhantomsOutOfKafkaThroughAnAsyncFailover(t *testing.T) {
	f := newFailover(t, false)
	db := f.db(t, f.primary)
	cfg := testenv.RelayConfig(db, f.k)
	cfg.BatchSize = 20
	cfg.RecoveryWindow = 100
	cfg.StandbyNames = []string{"stb1"}
	old := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	w := f.startWriters(t, f.primary, 300, "on")
	f.lag(3 * time.Second)
	f.failOver(t, w, 1500*time.Millisecond, old)
	promoted := f.afterPromotion(t, cfg, &testenv.SyncBuffer{})
	a := f.audit(t, promoted)
	t.Logf("after the fail-over: %s (%d rows written on the old primary)", a, w.written.Load())
	if len(a.phantoms)+len(a.duplicates)+len(a.missing) > 0 {
		t.Fatalf("exactly-once broken by a fail-over with OUTBOX_STANDBY_NAMES=stb1: %s", a)
	}
}

// TestAFailoverWithoutStandbyNamesReportsEveryPhantom: the same fail-over
// without the setting puts phantoms in Kafka; the relay on the promoted
// database must name every one of them (its checkpoint's window holds
// them all here), and say that the database's history changed.
func TestAFailoverWithoutStandbyNamesReportsEveryPhantom(t *testing.T) {
	f := newFailover(t, false)
	db := f.db(t, f.primary)
	cfg := testenv.RelayConfig(db, f.k)
	cfg.BatchSize = 20
	cfg.RecoveryWindow = 200
	old := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	w := f.startWriters(t, f.primary, 100, "on")
	time.Sleep(2 * time.Second)
	f.failOver(t, w, 1500*time.Millisecond, old)
	var log testenv.SyncBuffer
	promoted := f.afterPromotion(t, cfg, &log)
	a := f.audit(t, promoted)
	t.Logf("after the fail-over: %s", a)
	if len(a.phantoms) == 0 {
		t.Fatalf("the fail-over left no phantom to report (the standby was not behind?): %s", a)
	}
	out := log.String()
	if !strings.Contains(out, "timeline") {
		t.Errorf("the relay on the promoted database did not say that the timeline changed")
	}
	reported := map[int64]bool{}
	for _, m := range regexp.MustCompile(`"phantom_ids":\[([0-9,]*)\]`).FindAllStringSubmatch(out, -1) {
		for _, f := range strings.Split(m[1], ",") {
			id, _ := strconv.ParseInt(f, 10, 64)
			reported[id] = true
		}
	}
	var unreported []int64
	for _, id := range a.phantoms {
		if !reported[id] {
			unreported = append(unreported, id)
		}
	}
	if len(unreported) > 0 {
		t.Fatalf("%d of %d phantoms not reported by the relay: %v", len(unreported), len(a.phantoms), firstIDs(unreported))
	}
}

// TestStandbySynchronousStallPublishesNoPhantoms: a synchronous standby,
// writers at synchronous_commit=local and off (their commits return before
// the standby has them), the standby stalls while the relay is idle, rows
// are written, the primary crashes, the standby is promoted: Kafka holds no
// row the promoted database lacks.
func TestStandbySynchronousStallPublishesNoPhantoms(t *testing.T) {
	for _, level := range []string{"local", "off"} {
		t.Run(level, func(t *testing.T) {
			f := newFailover(t, true)
			db := f.db(t, f.primary)
			cfg := testenv.RelayConfig(db, f.k)
			cfg.BatchSize = 20
			cfg.RecoveryWindow = 100
			old := testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
			w := f.startWriters(t, f.primary, 200, level)
			time.Sleep(time.Second)
			w.Stop()
			faultsEventually(t, 30*time.Second, "the relay is idle", func() bool { return db.Unpublished(t) == 0 })
			f.standby.Stall()
			w = f.startWriters(t, f.primary, 20, level)
			time.Sleep(time.Second)
			f.failOver(t, w, 500*time.Millisecond, old)
			promoted := f.afterPromotion(t, cfg, &testenv.SyncBuffer{})
			a := f.audit(t, promoted)
			t.Logf("after the fail-over: %s (%d rows written while the standby stalled)", a, w.written.Load())
			if len(a.phantoms)+len(a.duplicates)+len(a.missing) > 0 {
				t.Fatalf("synchronous standby, writers at %s: %s", level, a)
			}
		})
	}
}

// TestAMissingStandbyHoldsPublishingVisiblyUntilReleased: a standby named
// in OUTBOX_STANDBY_NAMES that is not connected holds every batch: nothing
// is published, the metrics say which standby and for how long; restarted
// without it (the documented release), the relay publishes every row once.
func TestAMissingStandbyHoldsPublishingVisiblyUntilReleased(t *testing.T) {
	db := testenv.NewDB(t)
	topic := testenv.RandomName("payments-")
	k := testenv.NewKafka(t, 1, topic)
	ids := db.Insert(t, topic, 10, []string{"a", "b"})
	cfg := testenv.RelayConfig(db, k)
	cfg.StandbyNames = []string{"stb-gone"}
	reg := prometheus.NewRegistry()
	held := testenv.StartRelay(t, db, cfg, relay.WithRegisterer(reg), relay.WithLogger(testenv.Logger(t, nil)))
	faultsEventually(t, 20*time.Second, "the wait shows in outbox_relay_standby_held_seconds", func() bool {
		return gaugeValue(t, reg, "outbox_relay_standby_held_seconds", nil) > 1 &&
			gaugeValue(t, reg, "outbox_relay_standby_connected", map[string]string{"standby": "stb-gone"}) == 0
	})
	if n := db.Unpublished(t); n != len(ids) {
		t.Fatalf("%d of %d rows published while the named standby is missing", len(ids)-n, len(ids))
	}
	if err := held.Stop(); err != nil {
		t.Fatalf("stop: %v", err)
	}
	cfg.StandbyNames = nil
	testenv.StartRelay(t, db, cfg, relay.WithLogger(testenv.Logger(t, nil)))
	testenv.CheckExactlyOnce(t, ids, k.NewConsumer(t, topic).WaitFor(t, len(ids), 20*time.Second))
}

// gaugeValue reads a gauge of reg with the given labels (any, when nil).
func gaugeValue(t *testing.T, reg *prometheus.Registry, name string, labels map[string]string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			for _, lp := range m.GetLabel() {
				if v, ok := labels[lp.GetName()]; ok && v != lp.GetValue() {
					continue metrics
				}
			}
			return m.GetGauge().GetValue()
		}
	}
	return -1
}
