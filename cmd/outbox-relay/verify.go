package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"strings"
	"time"

	"github.com/outbox-relay/outbox-relay/outbox"
	"github.com/outbox-relay/outbox-relay/relay"
	"github.com/outbox-relay/outbox-relay/verify"
)

// Exit codes of `outbox-relay verify`.
const (
	verifyClean         = 0
	verifyDiscrepancies = 1
	verifyCannotCheck   = 2
)

// replicationVerifyNote says what verify proves with OUTBOX_SOURCE=replication,
// where rows are not marked after the hand-over.
const replicationVerifyNote = "OUTBOX_SOURCE=replication: rows are not marked in this mode, so verify proves that no row is in Kafka twice, that every record matches its row and keeps its key's order, and reports rows still not in Kafka after -stale; it cannot prove \"marked, so in Kafka\" (nothing is marked): a row not yet in Kafka is unpublished until -stale, whatever the checkpoint's LSN"

// runVerify is `outbox-relay verify`: the relay's configuration, a window of
// rows, a report; the exit code says clean (0), discrepancies (1) or could
// not check (2).
func runVerify(ctx context.Context, args, environ []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("verify", flag.ContinueOnError)
	fs.SetOutput(stderr)
	since := fs.Duration("since", 24*time.Hour, "verify the rows created, published, dead-lettered or discarded this long ago or later, and every unpublished row")
	fromID := fs.Int64("from-id", 0, "verify the rows with ids from this one (with -to-id; replaces -since)")
	toID := fs.Int64("to-id", 0, "... to this one, inclusive")
	stale := fs.Duration("stale", 5*time.Minute, "report rows unpublished for longer than this")
	margin := fs.Duration("margin", 10*time.Minute, "start reading Kafka this much before the window's oldest row (clock skew)")
	limit := fs.Int("limit", 20, "findings to list (all are counted)")
	asJSON := fs.Bool("json", false, "print the report as JSON")
	topics := fs.String("topics", "", "topics to read besides those the window's rows name, comma-separated; required with OUTBOX_ON_PUBLISH=delete, where published rows are gone from the table")
	allowForeign := fs.Bool("allow-foreign", false, "accept records without a valid outbox-id header (a topic other producers share): counted, not a finding")
	if err := fs.Parse(args); err != nil {
		return verifyCannotCheck
	}
	fail := func(err error) int {
		fmt.Fprintf(stderr, "outbox-relay verify: could not check: %v\n", err)
		return verifyCannotCheck
	}
	switch {
	case (*fromID > 0) != (*toID > 0):
		return fail(errors.New("-from-id and -to-id go together: give both, or neither (then -since)"))
	case *toID > 0 && *toID < *fromID:
		return fail(fmt.Errorf("-to-id %d is below -from-id %d", *toID, *fromID))
	case *since <= 0:
		return fail(fmt.Errorf("-since %v: expected a positive duration such as 24h", *since))
	}
	cfg, err := relay.LoadConfig(environ)
	if err != nil {
		return fail(fmt.Errorf("configuration: %w", err))
	}
	onPublish, _ := outbox.ParseOnPublish(cfg.OnPublish)         // validated
	order, _ := outbox.ParseDeadLetterOrder(cfg.DeadLetterOrder) // validated
	var topicList []string
	for t := range strings.SplitSeq(*topics, ",") {
		if t = strings.TrimSpace(t); t != "" {
			topicList = append(topicList, t)
		}
	}
	if onPublish == outbox.Delete && len(topicList) == 0 {
		return fail(errors.New("OUTBOX_ON_PUBLISH=delete: published rows are deleted, so the table no longer names their topics: give them with -topics (comma-separated)"))
	}
	kopts, err := relay.KafkaOptions(cfg)
	if err != nil {
		return fail(fmt.Errorf("configuration: %w", err))
	}
	pool, err := openPool(ctx, cfg.DatabaseURL, 2, nil, cfg.DatabaseAuth)
	if err != nil {
		return fail(err)
	}
	defer pool.Close()
	rep, err := verify.Run(ctx, verify.Config{
		Pool: pool, Table: outbox.Table{Schema: cfg.Schema, Name: cfg.Table},
		Brokers: cfg.KafkaBrokers, KafkaOptions: kopts, CheckpointTopic: cfg.CheckpointTopic,
		Since: *since, FromID: *fromID, ToID: *toID, Stale: *stale, Margin: *margin, Limit: *limit,
		Logger: newLogger(stderr, "warn"), OnPublish: onPublish, Topics: topicList,
		AllowForeign: *allowForeign, DeadLetterOrder: order,
	})
	if errors.Is(err, verify.ErrKafka) {
		err = fmt.Errorf("%w (brokers from OUTBOX_KAFKA_BROKERS=%s; TLS and SASL from OUTBOX_KAFKA_*): check that they are reachable from here", err, strings.Join(cfg.KafkaBrokers, ","))
	}
	if rep != nil && cfg.Source == "replication" && !*asJSON {
		fmt.Fprintln(stdout, replicationVerifyNote)
	}
	if rep != nil {
		if *asJSON {
			enc := json.NewEncoder(stdout)
			enc.SetIndent("", "  ")
			_ = enc.Encode(rep)
		} else {
			_ = rep.WriteText(stdout)
		}
	}
	switch {
	case err != nil:
		return fail(err)
	case !rep.Clean():
		return verifyDiscrepancies
	}
	return verifyClean
}
