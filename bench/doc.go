// Package bench holds outbox-relay's benchmarks. They print numbers and prove
// nothing: no test here runs under a plain `go test ./...`, only with -bench.
//
// They run against a real PostgreSQL (a fresh database per benchmark on the
// server of TEST_DATABASE_URL, as the integration tests do) and an in-process
// kfake cluster, or the real Kafka cluster named by KAFKA_BROKERS. Each
// benchmark's comment gives the command that suits it, for example:
//
//	go test -run '^$' -bench RelayThroughput -benchtime 50000x ./bench/
//
// bench/wakeup-writers.sh measures, with pgbench, what the wake-up trigger
// costs the applications that write the outbox. BENCHMARKS.md at the top of
// the repository records the figures, the machine and the commands.
package bench
