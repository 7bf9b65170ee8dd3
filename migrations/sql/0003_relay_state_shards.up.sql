-- outbox-relay schema, version 3: the shard count the table is split into.
--
-- Rows map to shards by a hash of their key modulo the shard count, and each
-- shard's recovery reads only its own checkpoint partition. A relay started
-- with another OUTBOX_SHARDS than the one recorded here refuses to run:
-- `outbox-relay reshard` recovers every old shard first, then records the
-- new count. NULL until the first relay records its count.

ALTER TABLE "public"."outbox_relay_state" ADD COLUMN shards integer CHECK (shards > 0);
