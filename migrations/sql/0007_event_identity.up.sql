-- outbox-relay schema, version 7: an event identity that two tables, a
-- restore and a fail-over cannot collide on.
--
-- The row id is unique only within one table and one sequence: two outbox
-- tables feeding one topic, or a table restored from a dump (or truncated
-- with RESTART IDENTITY, or failed over behind its sequence) reuse ids, and
-- a consumer deduplicating by (topic, outbox-id) takes new events for old.
-- event_id is the event's own identity: a random UUID by default, or one the
-- writer sets (an application's idempotency key). The relay sends it in the
-- record header "outbox-event-id"; the inbox deduplicates by it.
--
-- Rows written before this migration keep event_id NULL (adding the column
-- rewrites nothing, however large the table): the relay sends them without
-- the header, as before, and consumers deduplicate them by (topic,
-- outbox-id) as before. The NOT VALID check refuses a NULL in every row
-- written from now on, without scanning the old ones.
ALTER TABLE "public"."outbox" ADD COLUMN event_id uuid;
ALTER TABLE "public"."outbox" ALTER COLUMN event_id SET DEFAULT gen_random_uuid();
ALTER TABLE "public"."outbox" ADD CONSTRAINT "outbox_event_id_set" CHECK (event_id IS NOT NULL) NOT VALID;

-- A dead letter keeps its row's identity: requeued (in place or as new), it
-- is the same event, and a consumer that applied an earlier copy of it
-- applies it once.
ALTER TABLE "public"."outbox_dead_letter" ADD COLUMN event_id uuid;
