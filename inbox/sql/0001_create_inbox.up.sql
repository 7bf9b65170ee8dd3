-- outbox-relay inbox schema, version 1: the consumer side.
--
-- Plain SQL for the default names: schema public, tables inbox_*.
-- inbox.NewMigrator renames the schema and every identifier that starts
-- with inbox for the configured schema and table prefix (Config.Schema,
-- Config.Table); Migrator.SQL prints the rendered DDL for review or for
-- another migration tool.

CREATE SCHEMA IF NOT EXISTS "public";

-- One row per (consumer group, topic, partition): where the group resumes,
-- and the fence. The applying transaction of every batch locks this row
-- (SELECT ... FOR UPDATE), checks epoch against the epoch the instance got
-- when Kafka assigned it the partition, applies the events and moves
-- next_offset, all in one database transaction. An assignment increments
-- epoch under the same row lock, so a transaction of an instance that lost
-- the partition either committed before the new owner read next_offset, or
-- finds another epoch and commits nothing.
CREATE TABLE "public"."inbox_offsets" (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0), -- the next record to apply
    epoch          bigint      NOT NULL,                          -- bumped on every assignment
    owner          text        NOT NULL,                          -- the instance that holds epoch
    assigned_at    timestamptz NOT NULL DEFAULT now(),
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- The dedupe key: one row per event applied, by topic and outbox-id (the
-- relay's row id), written in the transaction that applied it. A record
-- whose (topic, outbox_id) is here is skipped, whatever its offset: a
-- second copy of a row (at-least-once relay mode, a restored outbox) is
-- never applied twice.
CREATE TABLE "public"."inbox_applied" (
    topic          text        NOT NULL,
    outbox_id      bigint      NOT NULL,
    consumer_group text        NOT NULL,
    partition      integer     NOT NULL,
    kafka_offset   bigint      NOT NULL,
    applied_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (topic, outbox_id)
);

-- For pruning old rows by age: DELETE ... WHERE applied_at < ...
CREATE INDEX "inbox_applied_applied_at_idx" ON "public"."inbox_applied" (applied_at);

-- Events the handler could not apply (retries exhausted, or refused as
-- permanent) and records without a valid outbox-id: a copy of the record
-- and the error, written in the same transaction that moves the offset past
-- it, so nothing is lost and the partition goes on.
CREATE TABLE "public"."inbox_dead_letter" (
    id             bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL,
    kafka_offset   bigint      NOT NULL,
    outbox_id      bigint,                -- NULL: the record had no valid outbox-id header
    key            bytea,
    value          bytea,
    headers        jsonb,                 -- [{"key": k, "value": v}], or {"key": k, "base64": v} for a value that is not UTF-8
    record_time    timestamptz,
    error          text        NOT NULL,
    attempts       integer     NOT NULL,
    failed_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (consumer_group, topic, partition, kafka_offset)
);
