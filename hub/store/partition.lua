#!lua
-- One atomic write of 1..n users of ONE partition, on Redis Cluster (see hub/store/cluster.py):
-- every key here carries the partition's hash tag, so the call runs on the one node that owns
-- the partition. It is write.lua's two-phase design for one partition: phase 1 only reads and
-- decides every outcome, phase 2 only writes, so a failure cannot follow a write (Redis does
-- not roll a script back). Emails are not here: their index is sharded by the email's own
-- hash, and a create or an email change holds a reservation on it (cluster.py) whose token
-- travels with the op; a token another writer has fenced (it found the reservation stale and
-- took it over) is refused, so a slow writer can never land after losing its email.
--
-- KEYS: 1 meta (hash: e=epoch, o=last offset, h=tag of the last write), 2 id index (zset, lex
--       order), 3 history (stream), 4 fences (zset: fenced reservation token -> time ms),
--       5.. each op's user key (hash: v=version, d=record, e=email key), in op order.
--       Every key is declared, so during a slot migration Redis redirects or refuses the
--       call whole (ASK / TRYAGAIN) instead of running it on a node missing some keys.
-- ARGV: 1 epoch to set if none exists, 2 history max length, 3 now (ms), 4 history max age
--       (ms), 5 the ops, one msgpack array of
--       [kind (c/u/d), id, expected version, record, event, email key, reservation token,
--        reservation time (ms)],
--       6 this call's tag, 7 the epoch the caller knows ("" if none), 8 the last offset the
--       caller saw here (-1 if none), 9 its tag, 10 the shard channel, 11 how long a
--       reservation stays valid (ms; fences are kept twice that), 12 the partition's number.
-- Returns {epoch, verdict, ...} as write.lua: verdict 0 applied, then status, value per op:
--   0 ok (offset), 1 not found, 3 version mismatch (stored version), 4 id taken,
--   5 reservation lost (fenced, or older than its validity): nothing of this op was written.
-- verdict 1: the epoch is not the caller's; verdict 2: the history is behind what the caller
-- saw (then its offset here).
local meta, ids, log_key, fences = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, now, max_age = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ops = cmsgpack.unpack(ARGV[5])
local tag, known_epoch = ARGV[6], ARGV[7]
local known_offset, known_head = tonumber(ARGV[8]), ARGV[9]
local channel, validity = ARGV[10], tonumber(ARGV[11])

-- Phase 1: read and decide. --------------------------------------------------------------

local state = redis.call('HMGET', meta, 'e', 'o', 'h')
local epoch, last, prev = state[1], tonumber(state[2] or 0), state[3] or ''
-- The stream's own last entry: XADD at or below it would fail half-way, so offsets always
-- continue past it, even if the meta hash lost its field.
local top = redis.call('XREVRANGE', log_key, '+', '-', 'COUNT', 1)[1]
if top then
  local top_offset = tonumber(string.match(top[1], '^(%d+)'))
  if top_offset > last then last = top_offset end
end
if known_epoch ~= '' and epoch ~= known_epoch then
  return {epoch, 1}
end
if known_offset >= 0 and (last < known_offset or
    (last == known_offset and known_head ~= '' and prev ~= known_head)) then
  return {epoch, 2, last}
end

local out = {epoch or ARGV[1], 0}
local version = {}   -- id -> stored version, or false (absent): this call's changes
local applied = {}
local first = last + 1

for i = 1, #ops do
  local op = ops[i]
  local kind, id, expected = op[1], op[2], op[3]
  local user_key = KEYS[4 + i]
  local status, value = 0, 0
  local stored = version[id]
  if stored == nil then
    stored = tonumber(redis.call('HGET', user_key, 'v')) or false
  end
  local token = op[7]
  if token ~= '' and (now - op[8] > validity or redis.call('ZSCORE', fences, token)) then
    status = 5
  elseif kind == 'c' then
    if stored then status = 4 else version[id] = 1 end
  elseif not stored then
    status = 1
  elseif stored ~= expected then
    status, value = 3, stored
  elseif kind == 'u' then
    version[id] = expected + 1
  else
    version[id] = false
  end
  if status == 0 then
    last = last + 1
    value = last
    applied[#applied + 1] = {op, user_key, value}
  end
  out[#out + 1] = status
  out[#out + 1] = value
end

-- Phase 2: write. ---------------------------------------------------------------------------

if #applied == 0 then
  return out
end
local events = {}
for _, a in ipairs(applied) do
  local op, user_key, offset = a[1], a[2], a[3]
  local kind, id = op[1], op[2]
  if kind == 'd' then
    redis.call('DEL', user_key)
    redis.call('ZREM', ids, id)
  else
    redis.call('HSET', user_key, 'v', kind == 'c' and 1 or op[3] + 1, 'd', op[4], 'e', op[6])
    if kind == 'c' then redis.call('ZADD', ids, 0, id) end
  end
  redis.call('XADD', log_key, 'MAXLEN', '~', maxlen, offset .. '-0', 'e', op[5], 't', now,
             'g', tag, 'q', prev)
  events[#events + 1] = op[5]
end
redis.call('HSET', meta, 'e', out[1], 'o', last, 'h', tag)
redis.call('ZREMRANGEBYSCORE', fences, '-inf', now - 2 * validity)

-- Age limit, as in write.lua: a few head entries per write keeps up.
redis.call('PEXPIRE', log_key, max_age)
local head = redis.call('XRANGE', log_key, '-', '+', 'COUNT', 16)
local keep = nil
for _, entry in ipairs(head) do
  local fields = entry[2]
  local t = 0
  for j = 1, #fields, 2 do
    if fields[j] == 't' then t = tonumber(fields[j + 1]) end
  end
  if t >= now - max_age then
    keep = entry[1]
    break
  end
end
if keep and keep ~= head[1][1] then
  redis.call('XTRIM', log_key, 'MINID', keep)
end

redis.call('SPUBLISH', channel,
  cmsgpack.pack(out[1], tonumber(ARGV[12]), first, #events, prev, tag) .. table.concat(events))
return out
