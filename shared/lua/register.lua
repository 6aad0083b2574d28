-- Register (or re-register) a worker and replace its whole active set, in one atomic step.
-- A registration always starts a new epoch, so its batch has seq 1; readers resync the
-- worker from its hash when they see `worker_up` or a new epoch (docs/protocol.md).
-- The heartbeat deadline is Redis's clock plus the worker's TTL (its own clock never counts).
-- Returns Redis's clock (epoch ms), from which the worker measures its offset to it.
-- KEYS: 1 workers  2 alive  3 seq  4 active:{worker_id}  5 events channel
-- ARGV: 1 worker_id  2 epoch  3 worker record JSON  4 ttl (ms)
--       5 envelope prefix (ends with "seq":)  6 events JSON array  7 n rows, then id,row pairs
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('DEL', KEYS[4])
local n = tonumber(ARGV[7])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[4], ARGV[8 + 2 * i], ARGV[9 + 2 * i])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':1')
redis.call('PUBLISH', KEYS[5], ARGV[5] .. '1,"events":' .. ARGV[6] .. '}')
return now
