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
-- KEYS: 1 meta (hash: e=epoch, o=last offset, h=tag of the last write, f=the offset up to
--       which tombstones may have been dropped), 2 id index (zset, lex order), 3 history
--       (stream), 4 fences (zset: fenced reservation token -> time ms), 5 changes (zset: id ->
--       offset of its last create or update), 6 deaths (zset: deleted id -> offset of its
--       deletion), 7 tombstones (hash: deleted id -> its deletion event),
--       8.. each op's user key (hash: v=version, d=record, e=email key), in op order, then
--       the idempotency keys of the ops that have one (string: msgpack [fingerprint,
--       partition, offset, epoch, event] of the write that used it).
--       Every key is declared, so during a slot migration Redis redirects or refuses the
--       call whole (ASK / TRYAGAIN) instead of running it on a node missing some keys.
-- ARGV: 1 epoch to set if none exists, 2 history max length, 3 now (ms), 4 history max age
--       (ms), 5 the ops, one msgpack array of
--       [kind (c/u/d), id, expected version, record, event, email key, reservation token,
--        reservation time (ms), the KEYS index of its idempotency key (0: none), request
--        fingerprint],
--       6 this call's tag, 7 the epoch the caller knows ("" if none), 8 the last offset the
--       caller saw here (-1 if none), 9 its tag, 10 the shard channel, 11 how long a
--       reservation stays valid (ms; fences are kept twice that), 12 the partition's number,
--       13 how long an idempotency key is kept (ms), 14 how long a tombstone is kept (ms).
-- Returns {epoch, verdict, ...} as write.lua: verdict 0 applied, then status, value per op:
--   0 ok (offset), 1 not found, 3 version mismatch (stored version), 4 id taken,
--   5 reservation lost (fenced, or older than its validity): nothing of this op was written,
--   6 already done under its idempotency key (value: the key's record), 7 the key was used
--   for another request, 9 the same as an earlier op of this call (value: its number).
-- verdict 1: the epoch is not the caller's; verdict 2: the history is behind what the caller
-- saw (then its offset here).
local meta, ids, log_key, fences = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, now, max_age = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local ops = cmsgpack.unpack(ARGV[5])
local tag, known_epoch = ARGV[6], ARGV[7]
local known_offset, known_head = tonumber(ARGV[8]), ARGV[9]
local channel, validity = ARGV[10], tonumber(ARGV[11])
local changes, deaths, tombs = KEYS[5], KEYS[6], KEYS[7]
local idem_window, retention = tonumber(ARGV[13]), tonumber(ARGV[14])

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
local claimed = {}   -- idempotency key -> {fingerprint, op number}: this call's keys

-- An op whose idempotency key is known gets the key's outcome (as in write.lua).
local function replayed(op)
  if op[9] == 0 then return nil end
  local key, fingerprint = KEYS[op[9]], op[10]
  local prior = claimed[key]
  if prior then
    if prior[1] == fingerprint then return 9, prior[2] end
    return 7, 0
  end
  local record = redis.call('GET', key)
  if not record then return nil end
  if cmsgpack.unpack(record)[1] == fingerprint then return 6, record end
  return 7, 0
end

for i = 1, #ops do
  local op = ops[i]
  local kind, id, expected = op[1], op[2], op[3]
  local user_key = KEYS[7 + i]
  local status, value = replayed(op)
  local stored = false
  if status then
    kind = 'replayed'
  else
    status, value = 0, 0
    stored = version[id]
    if stored == nil then
      stored = tonumber(redis.call('HGET', user_key, 'v')) or false
    end
  end
  local token = op[7]
  if kind == 'replayed' then
    -- decided above
  elseif token ~= '' and (now - op[8] > validity or redis.call('ZSCORE', fences, token)) then
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
    if op[9] ~= 0 then claimed[KEYS[op[9]]] = {op[10], i} end
  end
  out[#out + 1] = status
  out[#out + 1] = value
end

-- Phase 2: write. ---------------------------------------------------------------------------

if #applied == 0 then
  return out
end
local events = {}
local tracked = {}  -- ZADD arguments (offset, id, ...) of the change offsets
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
  if kind == 'd' then
    redis.call('ZREM', changes, id)
    redis.call('ZADD', deaths, offset, id)
    redis.call('HSET', tombs, id, op[5])
  else
    -- One ZADD for the call (below). A call is creates, or one update or delete: no
    -- id is both tracked and deleted in one.
    tracked[#tracked + 1] = offset
    tracked[#tracked + 1] = id
  end
  if op[9] ~= 0 then
    redis.call('SET', KEYS[op[9]], cmsgpack.pack({op[10], tonumber(ARGV[12]), offset, out[1],
               op[5]}), 'PX', idem_window)
  end
end
for at = 1, #tracked, 400 do
  redis.call('ZADD', changes, unpack(tracked, at, math.min(at + 399, #tracked)))
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

-- Tombstones past the retention go from the oldest (as in write.lua); the floor moves on.
local oldest = redis.call('ZRANGE', deaths, 0, 7, 'WITHSCORES')
local floor = nil
for j = 1, #oldest, 2 do
  local event = redis.call('HGET', tombs, oldest[j])
  if event and cmsgpack.unpack(event)[3] >= (now - retention) * 1000 then break end
  redis.call('ZREM', deaths, oldest[j])
  redis.call('HDEL', tombs, oldest[j])
  floor = oldest[j + 1]
end
if floor and tonumber(floor) > tonumber(redis.call('HGET', meta, 'f') or 0) then
  redis.call('HSET', meta, 'f', floor)
end

redis.call('SPUBLISH', channel,
  cmsgpack.pack(out[1], tonumber(ARGV[12]), first, #events, prev, tag) .. table.concat(events))
return out
