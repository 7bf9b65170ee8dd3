// Command outbox-relay moves committed rows from a PostgreSQL outbox table to
// Apache Kafka exactly once.
//
//	outbox-relay run                  relay, configured by OUTBOX_* variables
//	outbox-relay migrate up|status|sql
//	outbox-relay status               backlog, dead letters, schema
//	outbox-relay reshard              change the shard count safely
//	outbox-relay dlq list|requeue ID...|discard --reason TEXT ID...
//	outbox-relay verify [-since 24h | -from-id N -to-id M] [-json]
//	outbox-relay bench [-rows N ...]  relay against the database-only ceiling, and latency, in a scratch schema and topics
//	outbox-relay demo [-events N]     embedded Kafka, payments simulator, checker, ledger (inbox)
//	outbox-relay version
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"regexp"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/outbox-relay/outbox-relay/pgauth"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/tracing/otlpenv"
)

const usage = `outbox-relay moves committed PostgreSQL outbox rows to Kafka exactly once.

Usage:
  outbox-relay run                      run the relay (configured by OUTBOX_* variables)
  outbox-relay migrate up               apply pending migrations
  outbox-relay migrate status           list migrations and when they were applied
  outbox-relay migrate sql              print the DDL for the configured schema and table
  outbox-relay status                   recorded shards, relay name and mode, owners, backlog, dead letters
                                        and held rows (exit 1 while a migration is pending)
  outbox-relay reshard                  change the shard count to OUTBOX_SHARDS (every relay stopped)
  outbox-relay dlq list [-limit N] [-order newest|oldest] [-json]
                                        list dead letters, newest first
  outbox-relay dlq requeue ID...        move dead letters back into the outbox at their original ids
                                        (--as-new: as new rows, after everything written); exit 1 if
                                        an id is unknown, discarded, or has later rows of its key out
  outbox-relay dlq discard ID... --reason TEXT
                                        give dead letters up (kept for audit), releasing their keys
  outbox-relay verify [-since 24h | -from-id N -to-id M] [-json]
                                        reconcile Kafka with the table (exit 0 clean, 1 discrepancies, 2 could not check)
  outbox-relay bench [-rows N] [-row-bytes N] [-batch N] [-shards N] [-rounds N] [-delivery MODE]
                    [-on-publish mark|delete] [-rate N] [-latency-duration 10s]
                    [-skip-latency] [-skip-throughput] [-keep] [-json]
                                        measure on your database and Kafka, in a scratch schema and scratch
                                        topics removed afterwards: the relay's rows/s against the database-only
                                        ceiling (ratio), and commit-to-consume latency at -rate rows/s
  outbox-relay demo [-events N]         embedded Kafka + payments simulator + exactly-once checker + ledger
  outbox-relay version                  print the version and the commit it was built from

Configuration reference: docs/configuration.md.
`

func main() {
	setGCPercent(os.Getenv("GOGC"))
	setMemoryLimit(os.Getenv("GOMEMLIMIT"), "/sys/fs/cgroup/memory.max")
	os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
}

// defaultGCPercent is the garbage collector's target unless GOGC is set:
// the heap may grow to five times what is live before a collection, not
// twice. The relay's live heap is small (a batch or two of rows, the
// clients' buffers), while every row read and published is garbage: at
// Go's default of 100 the collector took a fifth of the relay's CPU
// draining a backlog, and the relay reached 0.73 of the database-only
// ceiling against a broker in another process instead of 0.8
// (BENCHMARKS.md, BenchmarkSeparateBroker). Set GOGC=100 for Go's default,
// GOMEMLIMIT to bound the heap.
const defaultGCPercent = 400

// setMemoryLimit bounds the heap, when GOMEMLIMIT is not set, at 80% of
// the memory the process's cgroup may use (cgroup v2's memory.max at path:
// a container's memory limit), so that the collector works harder near
// the limit instead of letting defaultGCPercent's heap reach the OOM
// killer. Without a limit (memory.max "max", or no cgroup v2) it does
// nothing.
func setMemoryLimit(gomemlimit, path string) {
	if gomemlimit != "" {
		return
	}
	if limit, ok := cgroupMemoryLimit(path); ok {
		debug.SetMemoryLimit(limit / 10 * 8)
	}
}

// cgroupMemoryLimit reads a cgroup v2 memory.max file: its bytes, and
// false for "max" or when it cannot be read.
func cgroupMemoryLimit(path string) (int64, bool) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return 0, false
	}
	n, err := strconv.ParseInt(strings.TrimSpace(string(raw)), 10, 64)
	if err != nil || n <= 0 {
		return 0, false
	}
	return n, true
}

// setGCPercent applies defaultGCPercent when gogc (the GOGC variable) is
// empty; the Go runtime has applied a set GOGC already.
func setGCPercent(gogc string) {
	if gogc == "" {
		debug.SetGCPercent(defaultGCPercent)
	}
}

// run is main without the process: it returns the exit code.
func run(args, environ []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, usage)
		return 2
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "run":
		err = runRelay(ctx, environ, stderr)
	case "migrate":
		err = runMigrate(ctx, args[1:], environ, stdout)
	case "status":
		err = runStatus(ctx, environ, stdout)
	case "reshard":
		err = runReshard(ctx, environ, stdout, stderr)
	case "dlq":
		err = runDLQ(ctx, args[1:], environ, stdout)
	case "verify":
		return runVerify(ctx, args[1:], environ, stdout, stderr)
	case "bench":
		err = runBench(ctx, args[1:], environ, stdout, stderr)
	case "demo":
		err = runDemo(ctx, args[1:], environ, stdout, stderr)
	case "demo-ledger": // hidden: the demo's ledger alone, for the kill tests
		err = runDemoLedger(ctx, args[1:], environ, stderr)
	case "version":
		fmt.Fprintf(stdout, "outbox-relay %s (commit %s, %s)\n", version(), commit(), runtime.Version())
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, usage)
	default:
		fmt.Fprintf(stderr, "outbox-relay: unknown command %q\n\n%s", args[0], usage)
		return 2
	}
	if err != nil {
		fmt.Fprintf(stderr, "outbox-relay %s: %v\n", args[0], err)
		return 1
	}
	return 0
}

// buildVersion and buildCommit are set at build time, as deploy/Dockerfile
// does: go build -ldflags "-X main.buildVersion=v1.2.3 -X main.buildCommit=$(git rev-parse HEAD)".
// Unset, the binary's build information gives them (`go install
// <module>/cmd/outbox-relay@v1.2.3`, or go build in a git checkout).
var buildVersion, buildCommit string

// version is the relay's version: buildVersion, else the main module's
// version in the build information (the tag of `go install ...@v1.2.3`,
// or the pseudo-version Go derives from a checkout's commit), else
// "(devel)".
func version() string {
	bi, _ := debug.ReadBuildInfo()
	v, _ := describeBuild(bi, buildVersion, buildCommit)
	return v
}

// commit is the commit the binary was built from, or "unknown".
func commit() string {
	bi, _ := debug.ReadBuildInfo()
	_, c := describeBuild(bi, buildVersion, buildCommit)
	return c
}

// pseudoVersionCommit matches the commit at the end of a Go pseudo-version
// (v0.0.0-20261207120739-0def4a23292c, v1.2.4-0.20261207120739-0def4a23292c).
var pseudoVersionCommit = regexp.MustCompile(`[-.][0-9]{14}-([0-9a-f]{12})(\+dirty)?$`)

// describeBuild returns the version and commit of a build: the -X values
// when set; else from bi, the version of its main module and the commit of
// its vcs.revision setting (with "-dirty" when vcs.modified), or the short
// commit of a pseudo-version; "(devel)" and "unknown" when nothing says.
// `go install <module>@v1.2.3` records the tag but no commit: the tag
// names it.
func describeBuild(bi *debug.BuildInfo, ldVersion, ldCommit string) (version, commit string) {
	version, commit = ldVersion, ldCommit
	if bi != nil {
		if version == "" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			version = bi.Main.Version
		}
		if commit == "" {
			modified := false
			for _, s := range bi.Settings {
				switch s.Key {
				case "vcs.revision":
					commit = s.Value
				case "vcs.modified":
					modified = s.Value == "true"
				}
			}
			if commit != "" && modified {
				commit += "-dirty"
			}
		}
		if commit == "" {
			if m := pseudoVersionCommit.FindStringSubmatch(bi.Main.Version); m != nil {
				commit = m[1]
			}
		}
	}
	if version == "" {
		version = "(devel)"
	}
	if commit == "" {
		commit = "unknown"
		if bi != nil && version == bi.Main.Version && version != "(devel)" && !pseudoVersionCommit.MatchString(version) {
			commit = "unknown (the tag " + version + " names it)"
		}
	}
	return version, commit
}

func newLogger(w io.Writer, level string) *slog.Logger {
	var l slog.Level
	_ = l.UnmarshalText([]byte(strings.ToUpper(level)))
	return slog.New(slog.NewJSONHandler(w, &slog.HandlerOptions{Level: l}))
}

// runRelay is `outbox-relay run`: configuration from the environment, then
// the relay until SIGINT or SIGTERM, then a clean stop (exit 0).
func runRelay(ctx context.Context, environ []string, stderr io.Writer) error {
	cfg, err := relay.LoadConfig(environ)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	// Tracing (OTEL_*, off by default); the spans left are flushed on the
	// way out, for at most 5 s.
	tp, stopTracing, err := otlpenv.Provider(ctx, environ, "outbox-relay")
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	defer func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		defer cancel()
		if err := stopTracing(sctx); err != nil {
			newLogger(stderr, cfg.LogLevel).Warn("flush traces", "err", err)
		}
	}()
	log := newLogger(stderr, cfg.LogLevel)
	kopts, err := relay.KafkaOptions(cfg, log)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	pool, err := openPool(ctx, cfg.DatabaseURL, cfg.Shards+4, &cfg, cfg.DatabaseAuth)
	if err != nil {
		return err
	}
	defer pool.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r, err := relay.New(cfg, pool, relay.WithLogger(log), relay.WithRegisterer(reg), relay.WithKafkaOptions(kopts...), relay.WithTracerProvider(tp))
	if err != nil {
		return err
	}
	if cfg.MetricsAddr != "" {
		ln, err := net.Listen("tcp", cfg.MetricsAddr)
		if err != nil {
			return fmt.Errorf("OUTBOX_METRICS_ADDR %q: %w", cfg.MetricsAddr, err)
		}
		srv := &http.Server{Handler: r.Handler(reg), ReadHeaderTimeout: 5 * time.Second}
		go func() {
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				log.Error("metrics server", "err", err)
			}
		}()
		defer srv.Close()
		log.Info("serving /metrics, /healthz, /readyz", "addr", ln.Addr().String())
	}
	log.Info("starting", "version", version(), "commit", commit(), "database", relay.RedactURL(cfg.DatabaseURL), "brokers", cfg.KafkaBrokers, "tracing", tp != nil)
	if err := r.Run(ctx); err != nil {
		return err
	}
	return nil
}

// runReshard is `outbox-relay reshard`: the relay's configuration, with
// OUTBOX_SHARDS the new count.
func runReshard(ctx context.Context, environ []string, stdout, stderr io.Writer) error {
	cfg, err := relay.LoadConfig(environ)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	kopts, err := relay.KafkaOptions(cfg)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	pool, err := openPool(ctx, cfg.DatabaseURL, 4, &cfg, cfg.DatabaseAuth)
	if err != nil {
		return err
	}
	defer pool.Close()
	r, err := relay.New(cfg, pool, relay.WithLogger(newLogger(stderr, cfg.LogLevel)), relay.WithKafkaOptions(kopts...))
	if err != nil {
		return err
	}
	defer r.Close()
	old, err := r.Reshard(ctx)
	if err != nil {
		return err
	}
	var changes []string
	if old.Shards != cfg.Shards {
		changes = append(changes, fmt.Sprintf("from %d to %d shards", old.Shards, cfg.Shards))
	}
	if old.RelayName != cfg.RelayName {
		changes = append(changes, fmt.Sprintf("relay name from %q to %q", old.RelayName, cfg.RelayName))
	}
	if old.CheckpointTopic != cfg.CheckpointTopic {
		changes = append(changes, fmt.Sprintf("checkpoint topic from %q to %q", old.CheckpointTopic, cfg.CheckpointTopic))
	}
	delivery := cfg.Delivery
	if delivery == "" {
		delivery = "exactly-once"
	}
	if old.Delivery != delivery {
		changes = append(changes, fmt.Sprintf("delivery from %s to %s", old.Delivery, delivery))
	}
	if len(changes) == 0 {
		fmt.Fprintf(stdout, "%s.%s already has %d shards, relay name %q, checkpoint topic %q and delivery %s (checkpoint topic partitions checked)\n",
			cfg.Schema, cfg.Table, old.Shards, old.RelayName, old.CheckpointTopic, old.Delivery)
		return nil
	}
	fmt.Fprintf(stdout, "resharded %s.%s %s: start the relays with OUTBOX_SHARDS=%d OUTBOX_RELAY_NAME=%s OUTBOX_CHECKPOINT_TOPIC=%s OUTBOX_DELIVERY=%s\n",
		cfg.Schema, cfg.Table, strings.Join(changes, ", "), cfg.Shards, cfg.RelayName, cfg.CheckpointTopic, delivery)
	return nil
}

// openPool is relay.OpenPool: one opener for every command.
// auth gives new connections their credentials (OUTBOX_DATABASE_PASSWORD_FILE,
// OUTBOX_DATABASE_IAM_*); with cfg, it is cfg.DatabaseAuth.
func openPool(ctx context.Context, url string, conns int, cfg *relay.Config, auth pgauth.Config) (*pgxpool.Pool, error) {
	return relay.OpenPoolAuth(ctx, url, conns, cfg, auth)
}
