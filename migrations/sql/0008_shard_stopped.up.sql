-- outbox-relay schema, version 8: a shard stopped until an operator acts is
-- recorded where every instance and `outbox-relay status` can see it.
--
-- A shard whose checkpoint partition holds a record that is not a checkpoint
-- (a tombstone written to "reset" it) stops for good: recovery cannot tell
-- which rows it committed. Its instance keeps the shard (a standby would stop
-- on the same record), so before this version only that instance's log and
-- /readyz said so. The instance now records when and why in the shard's row
-- of <table>_owner; the next owner that takes the shard clears both (and
-- records them again if the shard stops again). NULL: the shard runs.
ALTER TABLE "public"."outbox_owner"
    ADD COLUMN stopped_at     timestamptz,
    ADD COLUMN stopped_reason text;
