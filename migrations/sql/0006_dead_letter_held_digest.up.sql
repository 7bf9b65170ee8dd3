-- outbox-relay schema, version 6: keys and topics of any length.
--
-- A key is bytes of any length Kafka accepts (a record can be as large as
-- the producer's batch.size and the topic's max.message.bytes allow, a
-- 2 MiB key too), and a topic is text of any length until the relay
-- refuses it. A btree entry holds at most about 2,700 bytes: version 5's
-- index on (topic, key, id) refused the dead letter of a row with a
-- 3,200-byte key ("index row size 3232 exceeds btree version 4 maximum
-- 2704"), and the shard stopped on that row. This index holds the MD5 of
-- the topic and of the key instead (33 bytes each, whatever their length);
-- the relay's probe compares the digests through the index and then the
-- topic and key themselves, so a collision holds nothing it should not.
CREATE INDEX "outbox_dead_letter_held_digest" ON "public"."outbox_dead_letter" (md5(topic), md5(key), id)
    WHERE discarded_at IS NULL AND key IS NOT NULL;
DROP INDEX "public"."outbox_dead_letter_held";
