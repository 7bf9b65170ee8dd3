-- outbox-relay schema, version 4: what keeps the guarantee when operators
-- freeze processes, run instances with drifting settings, and lose
-- at-most-once batches.

-- Shard ownership with liveness. The advisory lock says who holds a shard;
-- this row says whether the holder is still making progress. The owner
-- renews renewed_at while its shard worker progresses; a standby that finds
-- the lease older than OUTBOX_OWNER_LEASE terminates the holder's session and
-- takes the shard. Every new owner bumps token, and every mark and
-- dead-letter statement of a relay checks the token it got (holding the row
-- FOR SHARE), so an owner that lost the shard can change no row of it: the
-- fencing token on the PostgreSQL side, as the transactional id is on the
-- Kafka side.
CREATE TABLE "public"."outbox_owner" (
    shard      integer     PRIMARY KEY,
    token      bigint      NOT NULL,
    owner      text        NOT NULL,  -- the instance, for operators: host, pid, start time
    taken_at   timestamptz NOT NULL DEFAULT now(),
    renewed_at timestamptz NOT NULL DEFAULT now()
);

-- The identity every relay of this table shares, recorded by the first relay
-- with the shard count: two instances with another OUTBOX_RELAY_NAME or
-- OUTBOX_CHECKPOINT_TOPIC would never fence each other, and a relay with
-- another OUTBOX_DELIVERY would not read the others' checkpoints (an
-- at-least-once relay would publish again what an exactly-once one
-- committed). `outbox-relay reshard` is the documented way to change them.
ALTER TABLE "public"."outbox_relay_state"
    ADD COLUMN relay_name       text,
    ADD COLUMN checkpoint_topic text,
    ADD COLUMN delivery         text;

-- At-most-once: every marked, unconfirmed batch is a row of its own until its
-- send is confirmed, so a batch marked by an old owner is still reported
-- after a new owner marked its own.
ALTER TABLE "public"."outbox_inflight" DROP CONSTRAINT "outbox_inflight_pkey";
ALTER TABLE "public"."outbox_inflight" ADD COLUMN batch bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY;
CREATE INDEX "outbox_inflight_shard" ON "public"."outbox_inflight" (shard);
