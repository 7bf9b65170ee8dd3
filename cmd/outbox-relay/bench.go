package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/outbox-relay/outbox-relay/loadtest"
	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
)

// runBench is `outbox-relay bench`: the relay's configuration and the
// flags, then package loadtest in a scratch schema and scratch topics.
func runBench(ctx context.Context, args, environ []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	rows := fs.Int("rows", 100000, "rows loaded for every drain")
	rowBytes := fs.Int("row-bytes", 200, "bytes of each row's value")
	batch := fs.Int("batch", 0, "rows per batch (default: OUTBOX_BATCH_SIZE)")
	shards := fs.Int("shards", 0, "shards (default: OUTBOX_SHARDS)")
	rounds := fs.Int("rounds", 3, "drains of the ceiling and of the relay, in turns")
	delivery := fs.String("delivery", "", "exactly-once, at-least-once or at-most-once (default: OUTBOX_DELIVERY)")
	onPublish := fs.String("on-publish", "", "what the relay and the database-only ceiling do to a published row: mark or delete (default: OUTBOX_ON_PUBLISH, else mark)")
	rate := fs.Int("rate", 2000, "rows committed per second in the latency phase")
	latency := fs.Duration("latency-duration", 10*time.Second, "how long the latency phase writes")
	skipLatency := fs.Bool("skip-latency", false, "leave the latency phase out")
	skipThroughput := fs.Bool("skip-throughput", false, "leave the throughput rounds out")
	keep := fs.Bool("keep", false, "keep the scratch schema and topics (debugging)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected argument %q: bench takes flags only (see -h)", fs.Arg(0))
	}
	cfg, err := relay.LoadConfig(environ)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	kopts, err := relay.KafkaOptions(cfg)
	if err != nil {
		return fmt.Errorf("configuration: %w", err)
	}
	c := loadtest.Config{
		Relay: cfg, KafkaOptions: kopts,
		Rows: *rows, RowBytes: *rowBytes, Batch: *batch, Shards: *shards, Delivery: *delivery,
		Rounds: *rounds, OnPublish: outbox.OnPublish(*onPublish), Rate: *rate, LatencyDuration: *latency,
		SkipLatency: *skipLatency, SkipThroughput: *skipThroughput, Keep: *keep,
		Logger: newLogger(stderr, "warn"), Out: stdout,
	}
	if c.OnPublish == "" {
		c.OnPublish = outbox.OnPublish(cfg.OnPublish)
	}
	if c.Batch == 0 {
		c.Batch = cfg.BatchSize
	}
	if c.Shards == 0 {
		c.Shards = cfg.Shards
	}
	if c.Delivery == "" {
		c.Delivery = cfg.Delivery
	}
	if *asJSON {
		c.Out = nil
	}
	// The first Ctrl-C cancels ctx and the run cleans up; a second one
	// kills the process as usual.
	defer context.AfterFunc(ctx, func() { signal.Reset(os.Interrupt, syscall.SIGTERM) })()
	rep, err := loadtest.Run(ctx, c)
	if *asJSON && rep != nil {
		enc := json.NewEncoder(stdout)
		enc.SetIndent("", "  ")
		_ = enc.Encode(rep)
	}
	return err
}
