// Package loadtest measures outbox-relay against an operator's own
// PostgreSQL and Kafka: `outbox-relay bench`. In a scratch schema and scratch
// topics, created for the run and removed after it (also on error and on
// Ctrl-C), it compares the relay's drain rate with the database-only ceiling
// (a read-and-mark loop with no Kafka at all), on freshly loaded rows, in
// interleaved rounds, and measures commit-to-consume latency at a steady
// write rate.
//
// The loops are exported (Load, DrainCeiling, DrainRelay, Latency) so that
// the Go benchmarks of package bench measure with the same code.
package loadtest

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"slices"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/txn"
)

// Config is one bench run.
type Config struct {
	// Relay is the relay's configuration (relay.LoadConfig): the database,
	// the brokers, TLS, SASL and producer settings. Its table, relay name,
	// checkpoint topic, shards, batch size and delivery mode are replaced
	// by the scratch ones and the fields below; its metrics listener and
	// retention are turned off.
	Relay relay.Config
	// KafkaOptions are relay.KafkaOptions(Relay): TLS and SASL.
	KafkaOptions []kgo.Opt
	// Rows rows of RowBytes bytes are loaded for every drain.
	Rows, RowBytes int
	// Batch, Shards and Delivery configure the relay and the ceiling.
	Batch, Shards int
	Delivery      string
	// Rounds is how many times the ceiling and the relay each drain.
	Rounds int
	// OnPublish is what the relay and the ceiling do to a published row:
	// mark it or delete it (OUTBOX_ON_PUBLISH).
	OnPublish outbox.OnPublish
	// Rate rows a second are written for LatencyDuration in the latency
	// phase.
	Rate            int
	LatencyDuration time.Duration
	// SkipThroughput and SkipLatency leave a phase out.
	SkipThroughput, SkipLatency bool
	// Keep leaves the scratch schema and topics in place (debugging).
	Keep bool
	// Logger receives the relay's log lines.
	Logger *slog.Logger
	// Out receives the human-readable lines as they are measured; nil
	// discards them.
	Out io.Writer

	// hook, if set, is called after each step ("scratch", "load",
	// "ceiling", "relay", "latency"); an error stops the run there, as a
	// failure would (tests).
	hook func(step string) error
}

// Validate checks the flags; each error names its flag and the fix.
func (c Config) Validate() error {
	var problems []string
	add := func(f string, a ...any) { problems = append(problems, fmt.Sprintf(f, a...)) }
	if c.Rows < 1 {
		add("-rows %d: expected at least 1 row to drain", c.Rows)
	}
	if c.RowBytes < 1 || c.RowBytes > 10<<20 {
		add("-row-bytes %d: expected a value size from 1 to 10485760 bytes", c.RowBytes)
	}
	if c.Batch < 1 || c.Batch > relay.MaxBatchSize {
		add("-batch %d: expected 1 to %d rows", c.Batch, relay.MaxBatchSize)
	}
	if c.Shards < 1 || c.Shards > 1024 {
		add("-shards %d: expected 1 to 1024", c.Shards)
	}
	if _, err := txn.ParseMode(c.Delivery); err != nil {
		add("-delivery: %v", err)
	}
	if c.Rounds < 1 {
		add("-rounds %d: expected at least 1", c.Rounds)
	}
	if _, err := outbox.ParseOnPublish(string(c.OnPublish)); err != nil || c.OnPublish == "" {
		add("-on-publish %q: expected mark or delete (OUTBOX_ON_PUBLISH: what the relay and the ceiling do to a published row)", c.OnPublish)
	}
	if !c.SkipLatency {
		if c.Rate < 1 {
			add("-rate %d: expected at least 1 row a second (or -skip-latency)", c.Rate)
		}
		if c.LatencyDuration <= 0 {
			add("-latency-duration %v: expected a positive duration such as 10s (or -skip-latency)", c.LatencyDuration)
		} else if float64(c.Rate)*c.LatencyDuration.Seconds() < 1 {
			add("-rate %d for -latency-duration %v writes no row: raise either", c.Rate, c.LatencyDuration)
		}
	}
	if c.SkipLatency && c.SkipThroughput {
		add("-skip-latency and -skip-throughput together leave nothing to measure: drop one")
	}
	if len(problems) > 0 {
		return errors.New(strings.Join(problems, "; "))
	}
	return nil
}

// Measurement is one line of the report.
type Measurement struct {
	// Name is ceiling-mark, ceiling-delete or relay.
	Name string `json:"name"`
	// Round counts from 1; 0 is the median over the rounds.
	Round   int     `json:"round"`
	Rows    int     `json:"rows"`
	Seconds float64 `json:"seconds"`
	Rate    float64 `json:"rows_per_s"`
	// StartSeconds is the relay's start until its first published rows,
	// included in Seconds; SteadyRate the rate after it (relay only).
	StartSeconds float64 `json:"start_seconds,omitempty"`
	SteadyRate   float64 `json:"steady_rows_per_s,omitempty"`
}

// Report is what a run measured.
type Report struct {
	// Schema and the topics are the scratch objects' names.
	Schema          string `json:"schema"`
	Topic           string `json:"topic"`
	CheckpointTopic string `json:"checkpoint_topic"`
	// Settings is the configuration, as printed first.
	Settings map[string]any `json:"settings"`
	// Measurements are the drains, round by round, then the medians.
	Measurements []Measurement `json:"measurements,omitempty"`
	// Ratio is the median relay rate (its start included) over the median
	// ceiling rate, SteadyRatio the same with the relay's steady rate; 0
	// when not measured.
	Ratio       float64 `json:"ratio,omitempty"`
	SteadyRatio float64 `json:"steady_ratio,omitempty"`
	// Latency is the latency phase's result, nil when skipped.
	Latency *LatencyResult `json:"latency,omitempty"`
	// Removed is true when the scratch objects were removed.
	Removed bool `json:"removed"`
}

// Run runs the bench: scratch schema and topics, the throughput rounds, the
// latency phase, then the clean-up, which also runs when a step fails or ctx
// is cancelled (Ctrl-C), with a context of its own. The report holds what
// was measured up to a failure.
func Run(ctx context.Context, c Config) (rep *Report, err error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	out := c.Out
	if out == nil {
		out = io.Discard
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
	step := func(name string) error {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("%s: %w", name, context.Cause(ctx))
		}
		if c.hook != nil {
			return c.hook(name)
		}
		return nil
	}
	writers := 8
	pool, err := relay.OpenPool(ctx, c.Relay.DatabaseURL, max(c.Shards, writers)+4, &c.Relay)
	if err != nil {
		return nil, err
	}
	defer pool.Close()

	sc, err := NewScratch(ctx, pool, c.Relay.KafkaBrokers, c.KafkaOptions, c.Shards, c.Logger)
	rep = &Report{Schema: sc.Table.Schema, Topic: sc.Topic, CheckpointTopic: sc.CheckpointTopic}
	defer func() {
		if c.Keep {
			sc.Close()
			fmt.Fprintf(out, "kept (-keep): schema %s, topics %s and %s; remove them with DROP SCHEMA %s CASCADE and your Kafka tools\n",
				sc.Table.Schema, sc.Topic, sc.CheckpointTopic, sc.Table.Schema)
			return
		}
		// Ctrl-C cancelled ctx: clean up with a context of its own.
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if rerr := sc.Remove(cctx); rerr != nil {
			err = errors.Join(err, fmt.Errorf("clean up: %w", rerr))
			return
		}
		rep.Removed = true
		fmt.Fprintf(out, "removed schema %s, topics %s and %s\n", sc.Table.Schema, sc.Topic, sc.CheckpointTopic)
	}()
	if err != nil {
		return rep, err
	}

	cfg := c.Relay
	cfg.Schema, cfg.Table = sc.Table.Schema, sc.Table.Name
	cfg.RelayName, cfg.CheckpointTopic = sc.RelayName(), sc.CheckpointTopic
	cfg.Shards, cfg.BatchSize, cfg.Delivery = c.Shards, c.Batch, c.Delivery
	cfg.MetricsAddr = ""
	cfg.Retention = 0
	if err := cfg.Validate(); err != nil {
		return rep, fmt.Errorf("configuration: %w", err)
	}
	rep.Settings = map[string]any{
		"database": relay.RedactURL(cfg.DatabaseURL), "brokers": strings.Join(cfg.KafkaBrokers, ","),
		"rows": c.Rows, "row_bytes": c.RowBytes, "batch": c.Batch, "shards": c.Shards, "delivery": c.Delivery,
		"on_publish": string(c.OnPublish), "rounds": c.Rounds, "rate": c.Rate, "latency_duration": c.LatencyDuration.String(),
	}
	fmt.Fprintf(out, "outbox-relay bench: PostgreSQL %s, Kafka %s\n", rep.Settings["database"], rep.Settings["brokers"])
	fmt.Fprintf(out, "scratch: schema %s, topics %s (%d partitions) and %s, relay name %s\n",
		sc.Table.Schema, sc.Topic, sc.Partitions, sc.CheckpointTopic, cfg.RelayName)
	if !c.SkipThroughput {
		fmt.Fprintf(out, "throughput: %d rows of %d bytes, batch %d, shards %d, delivery %s, on-publish %s, %d rounds\n",
			c.Rows, c.RowBytes, c.Batch, c.Shards, c.Delivery, c.OnPublish, c.Rounds)
		fmt.Fprintf(out, "  each round in a topic of its own (%s, then %s-r2, ...), the round before's deleted: a broker that keeps records does not slow later rounds\n",
			sc.Topic, sc.Topic)
	}
	if !c.SkipLatency {
		fmt.Fprintf(out, "latency: %d rows/s for %v, single-row transactions over %d connections\n", c.Rate, c.LatencyDuration, writers)
	}
	if err := step("scratch"); err != nil {
		return rep, err
	}
	topic := sc.Topic // the data topic of the round, then of the latency phase

	if !c.SkipThroughput {
		fmt.Fprintf(out, "\n%-16s %6s %9s %9s %10s\n", "measurement", "round", "rows", "seconds", "rows/s")
		line := func(m Measurement) {
			rep.Measurements = append(rep.Measurements, m)
			round, secs := "median", ""
			if m.Round > 0 {
				round, secs = fmt.Sprint(m.Round), fmt.Sprintf("%.2f", m.Seconds)
			}
			extra := ""
			if m.SteadyRate > 0 {
				extra = fmt.Sprintf("   steady %.0f rows/s", m.SteadyRate)
				if m.Round > 0 {
					extra = fmt.Sprintf("   start %.2f s, steady %.0f rows/s", m.StartSeconds, m.SteadyRate)
				}
			}
			fmt.Fprintf(out, "%-16s %6s %9d %9s %10.0f%s\n", m.Name, round, m.Rows, secs, m.Rate, extra)
		}
		ceilingName := "ceiling-" + string(c.OnPublish)
		// The relay settles published rows as the ceiling does.
		cfg.OnPublish = string(c.OnPublish)
		var ceil, rel, steady []float64
		for r := 1; r <= c.Rounds; r++ {
			// A topic of its own for every round: the broker holds none
			// of the earlier rounds' records (Scratch.RoundTopic).
			if topic, err = sc.RoundTopic(ctx, r); err != nil {
				return rep, err
			}
			if err := Load(ctx, pool, sc.Table, topic, c.Rows, c.RowBytes); err != nil {
				return rep, err
			}
			if err := step("load"); err != nil {
				return rep, err
			}
			d, n, err := DrainCeiling(ctx, pool, sc.Table, c.Batch, c.Shards, c.OnPublish)
			if err != nil {
				return rep, err
			}
			ceil = append(ceil, float64(n)/d.Seconds())
			line(Measurement{Name: ceilingName, Round: r, Rows: n, Seconds: d.Seconds(), Rate: ceil[len(ceil)-1]})
			if err := step("ceiling"); err != nil {
				return rep, err
			}
			if err := Load(ctx, pool, sc.Table, topic, c.Rows, c.RowBytes); err != nil {
				return rep, err
			}
			dr, err := DrainRelay(ctx, pool, cfg, c.Rows, 0, relay.WithLogger(c.Logger), relay.WithKafkaOptions(c.KafkaOptions...))
			if err != nil {
				return rep, err
			}
			rel, steady = append(rel, dr.Rate()), append(steady, dr.SteadyRate())
			line(Measurement{Name: "relay", Round: r, Rows: c.Rows, Seconds: dr.Elapsed.Seconds(), Rate: dr.Rate(),
				StartSeconds: dr.Start.Seconds(), SteadyRate: dr.SteadyRate()})
			if err := step("relay"); err != nil {
				return rep, err
			}
		}
		line(Measurement{Name: ceilingName, Rows: c.Rows, Rate: Median(ceil)})
		line(Measurement{Name: "relay", Rows: c.Rows, Rate: Median(rel), SteadyRate: Median(steady)})
		rep.Ratio, rep.SteadyRatio = Median(rel)/Median(ceil), Median(steady)/Median(ceil)
		fmt.Fprintf(out, "%-16s %6s %9s %9s %10.2f   steady %.2f\n", "ratio", "median", "", "", rep.Ratio, rep.SteadyRatio)
		// Empty the table for the latency phase: it measures from no backlog.
		if _, err := pool.Exec(ctx, `TRUNCATE `+sc.Table.Ident()); err != nil {
			return rep, fmt.Errorf("empty %s: %w", sc.Table, err)
		}
	}

	if !c.SkipLatency {
		res, err := Latency(ctx, LatencyConfig{
			Pool: pool, Relay: cfg, KafkaOptions: c.KafkaOptions, Topic: topic,
			RelayOptions: []relay.Option{relay.WithLogger(c.Logger), relay.WithKafkaOptions(c.KafkaOptions...)},
			Rate:         c.Rate, Duration: c.LatencyDuration, RowBytes: c.RowBytes, Writers: writers,
		})
		if err != nil {
			return rep, err
		}
		rep.Latency = &res
		ms := func(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }
		once := "yes"
		if !res.ExactlyOnce() {
			once = fmt.Sprintf("NO: %d missing, %d duplicates", res.Missing, res.Duplicates)
		}
		fmt.Fprintf(out, "\nlatency (commit to read_committed consume): p50 %.1f ms, p90 %.1f ms, p99 %.1f ms, max %.1f ms\n",
			ms(res.P50), ms(res.P90), ms(res.P99), ms(res.Max))
		fmt.Fprintf(out, "  %d rows at %.0f rows/s (writers at most %.0f ms behind), every row exactly once: %s\n",
			res.Rows, res.Rate, ms(res.Behind), once)
		if err := step("latency"); err != nil {
			return rep, err
		}
		if !res.ExactlyOnce() && c.Delivery == string(txn.ExactlyOnce) {
			return rep, fmt.Errorf("latency: %d rows missing, %d duplicates in exactly-once mode", res.Missing, res.Duplicates)
		}
		if res.Missing > 0 {
			return rep, fmt.Errorf("latency: %d rows did not arrive", res.Missing)
		}
	}
	return rep, nil
}

// Median is the median of v (0 for none).
func Median(v []float64) float64 {
	if len(v) == 0 {
		return 0
	}
	s := slices.Sorted(slices.Values(v))
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}
