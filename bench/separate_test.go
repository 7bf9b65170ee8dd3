package bench

import (
	"bufio"
	"cmp"
	"context"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/integration/testenv"
	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// BenchmarkSeparateBroker measures the relay the way an operator does,
// side by side with the way BenchmarkCeiling does, on the same rows, in
// turns, BENCH_SEPARATE_ROUNDS times (default 3), each drain of
// BENCH_SEPARATE_ROWS rows (default 200000) of 200 bytes:
//
//   - ceiling: the database-only loop (read a batch, mark it, repeat);
//   - in-process: the relay in this process against a kfake cluster in
//     this process, fresh for the drain (BenchmarkCeiling's set-up);
//   - relay+broker-process: the relay in this process against a kfake
//     cluster in a process of its own (bench/kfakebroker), fresh for the
//     drain;
//   - binary+broker-process: the built binary (`outbox-relay run`, built
//     as deploy/Dockerfile builds it) against a fresh broker process: what
//     an operator runs.
//
// Every drain's rate is read from the table afterwards (tableDrain: the
// marks' published_at), not by polling the relay: a scrape of the
// binary's /metrics every 10 ms took an eighth of its CPU. All of them use the relay's production defaults (relay.LoadConfig), with
// OUTBOX_BATCH_SIZE the sub-benchmark's batch. Each reports its median
// rate, its ratio to the ceiling of the same rounds, its steady ratio (from
// the first published row to the last: the relay's start left out), and
// for the broker process and the binary the CPU seconds they used per
// 100 000 rows (from /proc), with the machine's busy CPU seconds per
// 100 000 rows of the drain: where the two cores went.
//
// BENCH_BROKER_CPUS (e.g. "0") starts the broker process under
// `taskset -c`; run the benchmark itself under `taskset -c 1` with
// BENCH_PRIVATE_PG=1 (a private PostgreSQL started by the benchmark,
// inheriting its CPU) to give the broker one core and PostgreSQL, the
// relay and the ceiling the other:
//
//	go test -c -o /tmp/bench.test ./bench/ && cd bench &&
//	  BENCH_BROKER_CPUS=0 BENCH_PRIVATE_PG=1 taskset -c 1 /tmp/bench.test \
//	  -test.run '^$' -test.bench 'SeparateBroker/batch=1000' -test.benchtime 1x
func BenchmarkSeparateBroker(b *testing.B) {
	rows := envInt(b, "BENCH_SEPARATE_ROWS", 200000)
	rounds := envInt(b, "BENCH_SEPARATE_ROUNDS", 3)
	relayBin, brokerBin := buildBinaries(b)
	for _, batch := range []int{100, 1000, 5000} {
		b.Run(fmt.Sprintf("batch=%d", batch), func(b *testing.B) {
			separate(b, relayBin, brokerBin, batch, rows, rounds)
		})
	}
}

const separateTopic = "bench-separate"

func separate(b *testing.B, relayBin, brokerBin string, batch, rows, rounds int) {
	b.StopTimer()
	ctx := context.Background()
	db := benchDB(b)
	base := []string{
		"OUTBOX_DATABASE_URL=" + db.URL, "OUTBOX_SCHEMA=" + db.Table.Schema, "OUTBOX_TABLE=" + db.Table.Name,
		"OUTBOX_BATCH_SIZE=" + strconv.Itoa(batch), "OUTBOX_RETENTION=0", "OUTBOX_LOG_LEVEL=warn",
	}
	base = append(base, strings.Fields(os.Getenv("OUTBOX_BENCH_RELAY_ENV"))...)
	config := func(brokers []string) relay.Config {
		cfg, err := relay.LoadConfig(append(base, "OUTBOX_KAFKA_BROKERS="+strings.Join(brokers, ",")))
		if err != nil {
			b.Fatal(err)
		}
		return cfg
	}
	load := func() {
		if err := loadtest.Load(ctx, db.Pool, db.Table, separateTopic, rows, 200); err != nil {
			b.Fatal(err)
		}
	}
	type result struct {
		rate, steady []float64
		relayCPU     []float64 // per 100 000 rows
		brokerCPU    []float64
		busyCPU      []float64
	}
	var ceil result
	res := map[string]*result{"in-process": {}, "relay+broker-process": {}, "binary+broker-process": {}}
	variants := map[string]bool{}
	for _, v := range strings.Split(cmp.Or(os.Getenv("BENCH_SEPARATE_VARIANTS"), "in-process,relay+broker-process,binary+broker-process"), ",") {
		if _, ok := res[v]; !ok {
			b.Fatalf("BENCH_SEPARATE_VARIANTS: %q is not one of in-process, relay+broker-process, binary+broker-process", v)
		}
		variants[v] = true
	}
	per := func(cpu float64) float64 { return cpu / float64(rows) * 100000 }
	for range rounds {
		load()
		busy := machineBusy()
		d, n, err := loadtest.DrainCeiling(ctx, db.Pool, db.Table, batch, 1, outbox.Mark)
		if err != nil || n != rows {
			b.Fatalf("ceiling: %d of %d rows: %v", n, rows, err)
		}
		ceil.rate = append(ceil.rate, float64(n)/d.Seconds())
		ceil.busyCPU = append(ceil.busyCPU, per(machineBusy()-busy))

		// In this process: relay and a fresh kfake.
		if variants["in-process"] {
			load()
			c, err := kfake.NewCluster(kfake.NumBrokers(3), kfake.DefaultNumPartitions(3))
			if err != nil {
				b.Fatal(err)
			}
			createTopic(b, c.ListenAddrs())
			busy, self, start := machineBusy(), procCPU(os.Getpid()), time.Now()
			_, err = loadtest.DrainRelay(ctx, db.Pool, config(c.ListenAddrs()), rows, 0, relay.WithLogger(slog.New(slog.DiscardHandler)))
			c.Close()
			if err != nil {
				b.Fatal(err)
			}
			dr := tableDrain(b, db.Pool, db.Table, start, rows)
			r := res["in-process"]
			r.rate, r.steady = append(r.rate, dr.Rate()), append(r.steady, dr.SteadyRate())
			// This process: the relay and kfake together.
			r.relayCPU = append(r.relayCPU, per(procCPU(os.Getpid())-self))
			r.busyCPU = append(r.busyCPU, per(machineBusy()-busy))
		}

		// The relay in this process, the broker in its own.
		if variants["relay+broker-process"] {
			load()
			bp := startBrokerProcess(b, brokerBin)
			createTopic(b, bp.brokers)
			busy, bcpu, self, start := machineBusy(), procCPU(bp.cmd.Process.Pid), procCPU(os.Getpid()), time.Now()
			_, err := loadtest.DrainRelay(ctx, db.Pool, config(bp.brokers), rows, 0, relay.WithLogger(slog.New(slog.DiscardHandler)))
			if err != nil {
				b.Fatal(err)
			}
			dr := tableDrain(b, db.Pool, db.Table, start, rows)
			r := res["relay+broker-process"]
			r.rate, r.steady = append(r.rate, dr.Rate()), append(r.steady, dr.SteadyRate())
			r.relayCPU = append(r.relayCPU, per(procCPU(os.Getpid())-self))
			r.brokerCPU = append(r.brokerCPU, per(procCPU(bp.cmd.Process.Pid)-bcpu))
			r.busyCPU = append(r.busyCPU, per(machineBusy()-busy))
			bp.stop(b)
		}

		// The built binary against its own broker process.
		if variants["binary+broker-process"] {
			load()
			bp := startBrokerProcess(b, brokerBin)
			createTopic(b, bp.brokers)
			busy, bcpu := machineBusy(), procCPU(bp.cmd.Process.Pid)
			dr, rcpu := drainBinary(b, db.Pool, db.Table, relayBin, append(base, "OUTBOX_KAFKA_BROKERS="+strings.Join(bp.brokers, ",")), rows)
			r := res["binary+broker-process"]
			r.rate, r.steady = append(r.rate, dr.Rate()), append(r.steady, dr.SteadyRate())
			r.relayCPU = append(r.relayCPU, per(rcpu))
			r.brokerCPU = append(r.brokerCPU, per(procCPU(bp.cmd.Process.Pid)-bcpu))
			r.busyCPU = append(r.busyCPU, per(machineBusy()-busy))
			bp.stop(b)
		}
	}
	c1 := median(ceil.rate)
	b.ReportMetric(float64(rows), "rows")
	b.ReportMetric(c1, "ceiling-rows/s")
	b.ReportMetric(median(ceil.busyCPU), "ceiling-busy-cpu-s/100k")
	for _, name := range []string{"in-process", "relay+broker-process", "binary+broker-process"} {
		r := res[name]
		if !variants[name] {
			continue
		}
		b.ReportMetric(median(r.rate), name+"-rows/s")
		b.ReportMetric(median(r.rate)/c1, name+"-ratio")
		b.ReportMetric(median(r.steady)/c1, name+"-steady-ratio")
		b.ReportMetric(median(r.busyCPU), name+"-busy-cpu-s/100k")
		if len(r.brokerCPU) > 0 {
			b.ReportMetric(median(r.brokerCPU), name+"-broker-cpu-s/100k")
		}
		if len(r.relayCPU) > 0 {
			b.ReportMetric(median(r.relayCPU), name+"-relay-cpu-s/100k")
		}
	}
}

// benchDB is a fresh database on the shared server, or with
// BENCH_PRIVATE_PG=1 on a private PostgreSQL started by the benchmark (so
// that it runs on the CPUs the benchmark process was given).
func benchDB(b *testing.B) *testenv.DB {
	if os.Getenv("BENCH_PRIVATE_PG") != "1" {
		return testenv.NewDB(b)
	}
	pg := testenv.StartPrivatePostgres(b)
	b.Setenv("TEST_DATABASE_URL", pg.URL("postgres", "postgres"))
	return testenv.NewDB(b)
}

// buildBinaries builds outbox-relay as deploy/Dockerfile does (static,
// no symbols; OUTBOX_BENCH_RELAY_BIN instead, if set) and bench/kfakebroker.
func buildBinaries(b *testing.B) (relayBin, brokerBin string) {
	dir := b.TempDir()
	build := func(out, pkg string) {
		cmd := exec.Command("go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, pkg)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if o, err := cmd.CombinedOutput(); err != nil {
			b.Fatalf("build %s: %v\n%s", pkg, err, o)
		}
	}
	relayBin = os.Getenv("OUTBOX_BENCH_RELAY_BIN")
	if relayBin == "" {
		relayBin = filepath.Join(dir, "outbox-relay")
		build(relayBin, "../cmd/outbox-relay")
	}
	brokerBin = filepath.Join(dir, "kfakebroker")
	build(brokerBin, "./kfakebroker")
	return relayBin, brokerBin
}

// createTopic creates the benchmark's topic, 3 partitions of 3 replicas.
func createTopic(b *testing.B, brokers []string) {
	cl, err := kgo.NewClient(kgo.SeedBrokers(brokers...))
	if err != nil {
		b.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := kadm.NewClient(cl).CreateTopic(ctx, 3, 3, nil, separateTopic); err != nil {
		b.Fatalf("create topic %s: %v", separateTopic, err)
	}
}

// brokerProcess is a kfakebroker process.
type brokerProcess struct {
	cmd     *exec.Cmd
	brokers []string
	exited  chan error
}

// startBrokerProcess starts bench/kfakebroker (under taskset -c
// BENCH_BROKER_CPUS when set) and waits for its addresses.
func startBrokerProcess(b *testing.B, bin string) *brokerProcess {
	var cmd *exec.Cmd
	if cpus := os.Getenv("BENCH_BROKER_CPUS"); cpus != "" {
		cmd = exec.Command("taskset", "-c", cpus, bin)
	} else {
		cmd = exec.Command(bin)
	}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatalf("start the broker process: %v", err)
	}
	p := &brokerProcess{cmd: cmd, exited: make(chan error, 1)}
	line := make(chan string, 1)
	go func() {
		s := bufio.NewScanner(out)
		if s.Scan() {
			line <- s.Text()
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	go func() { p.exited <- cmd.Wait() }()
	select {
	case l := <-line:
		addrs, ok := strings.CutPrefix(l, "brokers: ")
		if !ok {
			b.Fatalf("broker process: unexpected first line %q", l)
		}
		p.brokers = strings.Split(addrs, ",")
	case err := <-p.exited:
		b.Fatalf("the broker process exited: %v", err)
	case <-time.After(10 * time.Second):
		_ = cmd.Process.Kill()
		b.Fatal("the broker process printed no addresses within 10s")
	}
	b.Cleanup(func() { _ = cmd.Process.Kill() })
	return p
}

func (p *brokerProcess) stop(b *testing.B) {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		b.Fatal("the broker process did not stop within 10s of SIGTERM")
	}
}

// drainBinary runs `outbox-relay run` with env until t has no unpublished
// row (asked every 200 ms: the relay itself is not polled, a scrape of its
// /metrics costs it CPU), then stops it with SIGTERM; it returns the drain
// as the table recorded it (tableDrain; start: from exec to the first
// mark) and the CPU seconds the process used.
func drainBinary(b *testing.B, pool *pgxpool.Pool, t outbox.Table, bin string, env []string, rows int) (loadtest.Drain, float64) {
	addr := freeAddr(b)
	cmd := exec.Command(bin, "run")
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OUTBOX_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	cmd.Env = append(cmd.Env, "OUTBOX_METRICS_ADDR="+addr)
	if os.Getenv("BENCH_SEPARATE_PPROF") != "" {
		cmd.Env = append(cmd.Env, "OUTBOX_PPROF=true")
	}
	var log strings.Builder
	cmd.Stdout, cmd.Stderr = &log, &log
	start := time.Now()
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			_ = cmd.Process.Kill()
		}
	}()
	profDir := os.Getenv("BENCH_SEPARATE_PPROF")
	profiled := false
	tick := time.NewTicker(200 * time.Millisecond)
	defer tick.Stop()
	for {
		if !profiled && profDir != "" && time.Since(start) > 300*time.Millisecond {
			profiled = true
			go saveProfile(addr, filepath.Join(profDir, fmt.Sprintf("binary-%d.pprof", time.Now().UnixNano())))
		}
		if !anyUnpublished(b, pool, t) {
			return tableDrain(b, pool, t, start, rows), procCPU(cmd.Process.Pid)
		}
		if time.Since(start) > 10*time.Minute {
			b.Fatalf("the relay binary did not publish %d rows in 10 minutes", rows)
		}
		select {
		case err := <-exited:
			exited <- err
			b.Fatalf("the relay binary exited before it published %d rows: %v\n%s", rows, err, log.String())
		case <-tick.C:
		}
	}
}

// anyUnpublished says whether t has a row not yet published.
func anyUnpublished(b *testing.B, pool *pgxpool.Pool, t outbox.Table) bool {
	var left bool
	if err := pool.QueryRow(context.Background(), `SELECT EXISTS (SELECT FROM `+t.Ident()+` WHERE published_at IS NULL)`).Scan(&left); err != nil {
		b.Fatal(err)
	}
	return left
}

// tableDrain is the drain as the table recorded it, with nothing polled
// from the relay: its rows were marked by transactions that set
// published_at = now(), so the first mark is min(published_at), the last
// max(published_at), and the first batch the rows marked with the first.
// start is when the relay was started.
func tableDrain(b *testing.B, pool *pgxpool.Pool, t outbox.Table, start time.Time, rows int) loadtest.Drain {
	var first, last time.Time
	var firstRows int
	err := pool.QueryRow(context.Background(), `SELECT min(published_at), max(published_at),
	       count(*) FILTER (WHERE published_at = (SELECT min(published_at) FROM `+t.Ident()+`))
	  FROM `+t.Ident()).Scan(&first, &last, &firstRows)
	if err != nil {
		b.Fatal(err)
	}
	return loadtest.Drain{Rows: rows, Elapsed: last.Sub(start), Start: first.Sub(start), FirstRows: firstRows}
}

// saveProfile saves one second of the relay's CPU profile
// (BENCH_SEPARATE_PPROF=dir: OUTBOX_PPROF=true, /debug/pprof/profile).
func saveProfile(addr, path string) {
	resp, err := http.Get("http://" + addr + "/debug/pprof/profile?seconds=1")
	if err != nil {
		return
	}
	defer resp.Body.Close()
	f, err := os.Create(path)
	if err != nil {
		return
	}
	defer f.Close()
	_, _ = io.Copy(f, resp.Body)
	// And what the drain allocated so far (alloc_space).
	resp, err = http.Get("http://" + addr + "/debug/pprof/allocs")
	if err != nil {
		return
	}
	defer resp.Body.Close()
	a, err := os.Create(strings.TrimSuffix(path, ".pprof") + ".allocs.pprof")
	if err != nil {
		return
	}
	defer a.Close()
	_, _ = io.Copy(a, resp.Body)
}

// freeAddr is a loopback address with a port free a moment ago.
func freeAddr(b *testing.B) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// procCPU is the user and system CPU seconds process pid has used
// (/proc/pid/stat), 0 if it cannot be read.
func procCPU(pid int) float64 {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The fields after the command name, which is in parentheses.
	f := strings.Fields(string(raw[strings.LastIndexByte(string(raw), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	s, _ := strconv.ParseFloat(f[12], 64)
	return (u + s) / clockTicks
}

// clockTicks is USER_HZ, the unit of /proc's CPU times: 100 on Linux.
const clockTicks = 100

// machineBusy is the CPU seconds all CPUs spent not idle since boot
// (/proc/stat), 0 if it cannot be read.
func machineBusy() float64 {
	raw, err := os.ReadFile("/proc/stat")
	if err != nil {
		return 0
	}
	line, _, _ := strings.Cut(string(raw), "\n")
	f := strings.Fields(line)
	var busy float64
	for i, v := range f[1:] {
		x, _ := strconv.ParseFloat(v, 64)
		if i != 3 && i != 4 { // idle, iowait
			busy += x
		}
	}
	return busy / clockTicks
}
