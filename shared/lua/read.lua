#!lua flags=no-writes
-- One worker's state in one atomic read: seq marker, worker record, deadline and rows, so the
-- rows a reader gets and the (epoch, seq) it gets belong together.
-- A script rather than MULTI/EXEC: Redis refuses every command queued in a MULTI once it is
-- at maxmemory (noeviction), while a `no-writes` script still runs there, during CLIENT PAUSE
-- WRITE and on a read-only replica. The flag needs Redis 7.0 (or Valkey); store.py runs the
-- same body without this first line on a server that does not know script flags.
-- KEYS: 1 seq  2 workers  3 alive  4 active:{worker_id}     ARGV: 1 worker_id
return {
  redis.call('HGET', KEYS[1], ARGV[1]),
  redis.call('HGET', KEYS[2], ARGV[1]),
  redis.call('ZSCORE', KEYS[3], ARGV[1]),
  redis.call('HGETALL', KEYS[4]),
}
