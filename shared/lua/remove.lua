-- Remove a worker and everything it owns, and publish `worker_down`, in one atomic step.
-- Used by reapers (ARGV[3] = 'expired': only if the deadline has passed on Redis's clock, so
-- a reaper racing a fresh heartbeat does nothing, whatever the reaper's own clock says) and by
-- the worker's own shutdown (ARGV[3] = '' and ARGV[4] = its epoch: only if that epoch is
-- still the registered one). Idempotent: returns 0 when there is nothing to remove, else the
-- seq of the `worker_down` batch. A seq marker that is not "epoch:seq" is garbage (written by
-- someone else): the worker is removed all the same, with epoch '-' and seq 1.
-- KEYS: 1 alive  2 workers  3 seq  4 active:{worker_id}  5 events channel
-- ARGV: 1 worker_id  2 envelope head (ends with "epoch":)  3 'expired' or ''
--       4 required epoch or ''  5 events JSON array
local marker = redis.call('HGET', KEYS[3], ARGV[1])
if ARGV[3] ~= '' then
  local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
  local t = redis.call('TIME')
  local now = t[1] * 1000 + math.floor(t[2] / 1000)
  if deadline and (tonumber(deadline) or 0) > now then return 0 end
  if not deadline and not marker and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
    return 0
  end
end
local epoch, seq = '-', 1
if marker then
  local sep = string.find(marker, ':', 1, true)
  local n = sep and tonumber(string.sub(marker, sep + 1))
  if n then
    epoch = string.sub(marker, 1, sep - 1)
    seq = n + 1
  end
end
if ARGV[4] ~= '' and epoch ~= ARGV[4] then return 0 end
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[3], ARGV[1])
redis.call('DEL', KEYS[4])
redis.call('PUBLISH', KEYS[5],
  ARGV[2] .. cjson.encode(epoch) .. ',"seq":' .. seq .. ',"events":' .. ARGV[5] .. '}')
return seq
