-- Apply one batch of a worker's events to its state and publish the notice, atomically.
-- The script picks the sequence number itself (stored seq + 1), so numbers are contiguous
-- per epoch whatever happened to earlier calls. Returns the seq, or -1 when this epoch is
-- not the worker's registered one (reaped, or superseded; or a garbage seq marker): the
-- worker must re-register. A worker that is publishing is alive: every applied batch pushes
-- its heartbeat deadline forward (Redis's clock plus its TTL), as a heartbeat does.
-- KEYS: 1 seq  2 active:{worker_id}  3 completed stream  4 events channel  5 alive
-- ARGV: 1 worker_id  2 epoch  3 envelope prefix  4 events JSON array  5 completed maxlen
--       6 ttl (ms)
--       7 n_set, then n_set (request_id, row JSON) pairs
--       then n_del, then n_del request_ids
--       then n_done, then n_done finished requests, each one JSON array of its 15 stream
--       values as strings, in schema.COMPLETED_FIELDS order (strings, so that Lua never turns
--       a number into text: its tostring keeps 14 digits, and start_time needs 16)
local marker = redis.call('HGET', KEYS[1], ARGV[1])
if not marker then return -1 end
local sep = string.find(marker, ':', 1, true)
if not sep or string.sub(marker, 1, sep - 1) ~= ARGV[2] then return -1 end
local seq = tonumber(string.sub(marker, sep + 1))
if not seq then return -1 end
seq = seq + 1

local i = 7
local n_set = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_set do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1]); i = i + 2
end
local n_del = tonumber(ARGV[i]); i = i + 1
for _ = 1, n_del do
  redis.call('HDEL', KEYS[2], ARGV[i]); i = i + 1
end
local n_done = tonumber(ARGV[i]); i = i + 1
local names = {'request_id', 'worker_id', 'model', 'method', 'path', 'status', 'outcome',
               'start_time', 'duration_ms', 'input_tokens', 'output_tokens', 'bytes_out',
               'ttft_ms', 'ttfb_ms', 'labels'}
for _ = 1, n_done do
  local values = cjson.decode(ARGV[i]); i = i + 1
  local args = {KEYS[3], 'MAXLEN', '~', ARGV[5], '*'}
  for f = 1, #names do
    args[#args + 1] = names[f]
    args[#args + 1] = values[f]
  end
  redis.call('XADD', unpack(args))
end

redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. seq)
local t = redis.call('TIME')
redis.call('ZADD', KEYS[5], t[1] * 1000 + math.floor(t[2] / 1000) + tonumber(ARGV[6]), ARGV[1])
redis.call('PUBLISH', KEYS[4], ARGV[3] .. seq .. ',"events":' .. ARGV[4] .. '}')
return seq
