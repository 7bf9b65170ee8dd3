-- outbox-relay schema, version 5: order per key through dead letters.

-- `outbox-relay dlq discard` keeps a dead letter for audit, with why and
-- when it was given up; a discarded dead letter no longer holds its key.
ALTER TABLE "public"."outbox_dead_letter"
    ADD COLUMN discarded_at   timestamptz,
    ADD COLUMN discard_reason text;

-- OUTBOX_DEAD_LETTER_ORDER=hold-key (the default): the relay's read skips an
-- unpublished row while a dead letter of the same topic and key with a lower
-- id is not discarded. This index answers that probe (an index-only lookup
-- per candidate row, on an index as small as the open dead letters).
CREATE INDEX "outbox_dead_letter_held" ON "public"."outbox_dead_letter" (topic, key, id)
    WHERE discarded_at IS NULL AND key IS NOT NULL;
