-- The stream service's reaper asks this every tick: Redis's clock, and whether Redis accepts
-- writes right now. The write changes nothing (ZADD XX of a member no worker id can be: ids
-- have no spaces), but Redis judges it as it judges a worker's heartbeat, so it is refused
-- exactly when heartbeats are: at maxmemory with noeviction (OOM), after a failed save
-- (MISCONF), on a replica (READONLY). During CLIENT PAUSE WRITE the call itself waits.
-- A reaper must not judge heartbeat deadlines while writes are refused: the workers could
-- not have pushed them forward.
-- KEYS: 1 alive     ARGV: 1 a member that is no worker id
-- Returns {now in epoch ms, ''} or {now in epoch ms, Redis's refusal}.
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local reply = redis.pcall('ZADD', KEYS[1], 'XX', 0, ARGV[1])
if type(reply) == 'table' and reply.err then return {now, reply.err} end
return {now, ''}
