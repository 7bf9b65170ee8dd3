// Command kfakebroker runs a kfake Kafka-protocol cluster (franz-go's
// pkg/kfake) in a process of its own, so that the relay and the broker do
// not share a Go runtime: the set-up an operator measures with
// `outbox-relay bench` or `outbox-relay run` against a real cluster.
//
//	go run ./bench/kfakebroker -brokers 3
//
// prints one line, "brokers: host:port,host:port,...", once the cluster
// listens, then serves until SIGINT or SIGTERM. kfake keeps every record in
// memory for as long as its topic exists: delete topics between rounds (as
// `outbox-relay bench` does) or start a fresh process for each drain.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"github.com/twmb/franz-go/pkg/kfake"
)

func main() {
	brokers := flag.Int("brokers", 3, "number of brokers")
	partitions := flag.Int("partitions", 3, "default partitions of a topic created without a count")
	autoCreate := flag.Bool("auto-create", false, "create unknown topics on first use (Kafka's auto.create.topics.enable)")
	flag.Parse()
	if err := run(*brokers, *partitions, *autoCreate); err != nil {
		fmt.Fprintln(os.Stderr, "kfakebroker:", err)
		os.Exit(1)
	}
}

func run(brokers, partitions int, autoCreate bool) error {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	opts := []kfake.Opt{kfake.NumBrokers(brokers), kfake.DefaultNumPartitions(partitions)}
	if autoCreate {
		opts = append(opts, kfake.AllowAutoTopicCreation())
	}
	c, err := kfake.NewCluster(opts...)
	if err != nil {
		return fmt.Errorf("start the cluster: %w", err)
	}
	defer c.Close()
	fmt.Printf("brokers: %s\n", strings.Join(c.ListenAddrs(), ","))
	<-ctx.Done()
	return nil
}
