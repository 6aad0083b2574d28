-- Redis's clock in epoch ms: the one clock every liveness deadline is judged on.
-- KEYS: 1 alive (never read: it routes the call to the node that holds the deadlines, so in
-- a cluster the time comes from the same clock the other scripts use)
local t = redis.call('TIME')
return t[1] * 1000 + math.floor(t[2] / 1000)
