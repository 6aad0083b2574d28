-- Register (or re-register) a worker and replace its whole active set, in one atomic step.
-- A registration always starts a new epoch, so its batch has seq 1; readers resync the
-- worker from its hash when they see `worker_up` or a new epoch (docs/protocol.md).
-- The heartbeat deadline is Redis's clock plus the worker's TTL (its own clock never counts).
-- Claim: with ARGV[7] (this process's instance id) set, the id is refused when a live process
-- of another instance holds it (its deadline is still ahead on Redis's clock): nothing is
-- written and the holder's record (or '' when it left none) is returned, so two live
-- processes never share an id. With ARGV[7] empty the id is taken over, whoever held it.
-- Returns Redis's clock (epoch ms) when it registered, from which the worker measures its
-- offset to it; the holder's record (a string) when it refused.
-- KEYS: 1 workers  2 alive  3 seq  4 active:{worker_id}  5 events channel
-- ARGV: 1 worker_id  2 epoch  3 worker record JSON  4 ttl (ms)
--       5 envelope prefix (ends with "seq":)  6 events JSON array  7 instance to claim for, or ''
--       8 n rows, then id,row pairs
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
if ARGV[7] ~= '' then
  local deadline = tonumber(redis.call('ZSCORE', KEYS[2], ARGV[1]) or '')
  if deadline and deadline > now then
    local held = redis.call('HGET', KEYS[1], ARGV[1])
    local holder = ''
    if held then
      -- Records are untrusted input: a garbage one is simply someone else's.
      local ok, record = pcall(cjson.decode, held)
      if ok and type(record) == 'table' and type(record['instance']) == 'string' then
        holder = record['instance']
      end
    end
    if holder ~= ARGV[7] then return held or '' end
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
redis.call('DEL', KEYS[4])
local n = tonumber(ARGV[8])
for i = 0, n - 1 do
  redis.call('HSET', KEYS[4], ARGV[9 + 2 * i], ARGV[10 + 2 * i])
end
redis.call('HSET', KEYS[3], ARGV[1], ARGV[2] .. ':1')
redis.call('PUBLISH', KEYS[5], ARGV[5] .. '1,"events":' .. ARGV[6] .. '}')
return now
