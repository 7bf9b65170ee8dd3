package outbox

// ShardFilter returns the condition by which the relay reads one shard of
// several (rows map to shards by a hash of their key, keyless rows by id),
// to be appended to a WHERE clause on the outbox table, and its arguments,
// numbered from $argN. With one shard it is empty. It is
// exported for tools that must read exactly as the relay does, such as the
// database-only ceiling of `outbox-relay bench` (package loadtest).
func ShardFilter(shard, shards, argN int) (string, []any) {
	return shardFilter(shard, shards, argN)
}
