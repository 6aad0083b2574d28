-- Push a worker's heartbeat deadline forward, but only while its epoch is the registered one.
-- The deadline is Redis's own clock plus the worker's TTL, so a worker's clock never matters.
-- Returns Redis's clock (epoch ms, which the worker uses to measure its offset to it), or 0
-- when the worker was reaped or superseded (it must re-register).
-- KEYS: 1 seq  2 alive     ARGV: 1 worker_id  2 epoch  3 ttl (ms)
local marker = redis.call('HGET', KEYS[1], ARGV[1])
if not marker or string.sub(marker, 1, #ARGV[2] + 1) ~= ARGV[2] .. ':' then return 0 end
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[1])
return now
