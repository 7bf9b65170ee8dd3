-- outbox-relay inbox schema, version 2: deduplicate by the event's identity.
--
-- A record with an "outbox-event-id" header (relay schema version 7 and
-- later) is deduplicated by (topic, event_id): unique across outbox tables,
-- databases, restores and fail-overs, where the row id is not (two tables
-- feeding one topic, or a restored table whose sequence starts over, reuse
-- row ids). A record without it (written before the relay's migration 7)
-- is deduplicated by (topic, outbox_id), as in version 1; its rows keep
-- event_id NULL.
ALTER TABLE "public"."inbox_applied" ADD COLUMN event_id uuid;
ALTER TABLE "public"."inbox_applied" DROP CONSTRAINT "inbox_applied_pkey";
CREATE UNIQUE INDEX "inbox_applied_legacy" ON "public"."inbox_applied" (topic, outbox_id) WHERE event_id IS NULL;
CREATE UNIQUE INDEX "inbox_applied_event" ON "public"."inbox_applied" (topic, event_id) WHERE event_id IS NOT NULL;

-- A dead-lettered record keeps its event id, NULL when it had none.
ALTER TABLE "public"."inbox_dead_letter" ADD COLUMN event_id uuid;
