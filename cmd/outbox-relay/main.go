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
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"

	"github.com/outbox-relay/outbox-relay/relay"
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
  outbox-relay version                  print the version

Configuration reference: README.md, "Configuration".
`

func main() {
	os.Exit(run(os.Args[1:], os.Environ(), os.Stdout, os.Stderr))
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
		fmt.Fprintln(stdout, "outbox-relay", version())
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

// buildVersion is set at build time: go build -ldflags "-X main.buildVersion=v1.2.3".
var buildVersion string

func version() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "(devel)"
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
	log := newLogger(stderr, cfg.LogLevel)
	kopts, err := relay.KafkaOptions(cfg)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	pool, err := openPool(ctx, cfg.DatabaseURL, cfg.Shards+4, &cfg)
	if err != nil {
		return err
	}
	defer pool.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	r, err := relay.New(cfg, pool, relay.WithLogger(log), relay.WithRegisterer(reg), relay.WithKafkaOptions(kopts...))
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
	log.Info("starting", "version", version(), "database", relay.RedactURL(cfg.DatabaseURL), "brokers", cfg.KafkaBrokers)
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
	pool, err := openPool(ctx, cfg.DatabaseURL, 4, &cfg)
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
func openPool(ctx context.Context, url string, conns int, cfg *relay.Config) (*pgxpool.Pool, error) {
	return relay.OpenPool(ctx, url, conns, cfg)
}
