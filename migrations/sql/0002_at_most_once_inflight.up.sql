-- outbox-relay schema, version 2: the at-most-once in-flight record.
--
-- In at-most-once mode the relay marks a batch published before it produces
-- it. In the same transaction it records the batch's ids here, and clears
-- them once the batch is sent. A relay that finds ids here at start-up knows
-- the previous owner of the shard crashed between the mark and the send: it
-- reports those rows as possibly lost (log and metric), then clears them.

CREATE TABLE "public"."outbox_inflight" (
    shard     integer     PRIMARY KEY,
    ids       bigint[]    NOT NULL,
    marked_at timestamptz NOT NULL DEFAULT now()
);
