#!lua
-- (The shebang declares this a Redis 7 script with no flags: it may write, so Redis refuses
-- it WHOLE, before it runs, when memory is over maxmemory or on a read-only replica. Without
-- it, Redis would fail the first write command inside, after earlier ones had run.)
--
-- One atomic write of 1..n users: each op changes its record, the email index and the id
-- index, takes the next offset of its partition, appends its event to that partition's stream
-- (the history, bounded by length and age), and the events are PUBLISHed, one message per
-- partition. A refused op changes nothing and does not stop the others (bulk rows are
-- independent).
--
-- Redis does not roll a script back when a command fails half-way, so the script runs in two
-- phases: the first only reads and decides every outcome (including what earlier ops of the
-- same call change), the second only writes, and nothing in it can fail for a reason the
-- first did not rule out.
--
-- KEYS: 1 email index (hash email_key -> id), 2 id index (zset, lex order), 3 offsets (hash
--       partition -> last offset), 4 epoch (string), 5 heads (hash partition -> the tag of
--       the last write to it), 6 floors (hash partition -> the offset up to which tombstones
--       may have been dropped: a resync by state from before it is refused).
-- ARGV: 1 epoch to set if none exists, 2 history max length, 3 key prefix ("hub:"), 4 now (ms),
--       5 history max age (ms), 6 the ops, one msgpack array of
--       [kind (c/u/d), id, expected version, old email key, new email key, record, partition,
--        event, idempotency key name ("": none), request fingerprint],
--       7 this call's tag (random, identifies this write in every partition it touches),
--       8 the epoch the caller knows ("" if none), 9 what the caller knows of the partitions
--       this call touches: msgpack array of [partition, last offset, its tag],
--       10 how long an idempotency key is kept (ms), 11 how long a tombstone is kept (ms).
-- Also derived: {prefix}idem:{name} (string: msgpack [fingerprint, partition, offset, epoch,
-- event] of the write that used the key), and per partition {prefix}chg:{p} (zset: id -> the
-- offset of its last create or update), {prefix}dead:{p} (zset: deleted id -> the offset of
-- its deletion) and {prefix}tomb:{p} (hash: deleted id -> its deletion event): what a resync
-- by state reads.
-- The user keys ({prefix}user:{id}) and partition streams ({prefix}log:{p}) are derived here
-- rather than passed in KEYS: a bulk write touches hundreds, and passing each as an argument
-- costs more than the write itself. hub runs against one Redis (not a cluster), where that is
-- allowed.
-- Returns {epoch, verdict, ...}:
--   verdict 0: applied; then status, value per op: status 0 ok (value: offset), 1 not found,
--              2 email taken, 3 version mismatch (value: stored version), 4 id taken,
--              6 already done under its idempotency key (value: the key's record), 7 its
--              idempotency key was used for another request, 9 the same as an earlier op of
--              this call with the same key (value: that op's number, from 1).
--   verdict 1: nothing written: the epoch is not the one the caller knows (epoch false: none).
--   verdict 2: nothing written: the history is behind what the caller saw (a Redis that came
--              back with older data); then the partition and its offset here.
local emails, ids, offsets, epoch_key, heads = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local floors = KEYS[6]
local idem_window, retention = tonumber(ARGV[10]), tonumber(ARGV[11])
local maxlen, prefix = ARGV[2], ARGV[3]
local now, max_age = tonumber(ARGV[4]), tonumber(ARGV[5])
local ops = cmsgpack.unpack(ARGV[6])
local tag, known_epoch = ARGV[7], ARGV[8]
local known = cmsgpack.unpack(ARGV[9])

-- Phase 1: read and decide. --------------------------------------------------------------

local epoch = redis.call('GET', epoch_key)
if known_epoch ~= '' and epoch ~= known_epoch then
  return {epoch, 1}
end
for _, k in ipairs(known) do
  local p, offset, head = k[1], k[2], k[3]
  local here = tonumber(redis.call('HGET', offsets, p) or 0)
  if here < offset or (here == offset and head ~= '' and redis.call('HGET', heads, p) ~= head) then
    return {epoch, 2, p, here}
  end
end

local out = {epoch or ARGV[1], 0}
local owner = {}     -- email key -> id, or false: this call's changes to the email index
local version = {}   -- id -> stored version, or false (absent): this call's changes
local batches, order = {}, {}
local applied = {}   -- the ops to write, in order, each with its offset
local claimed = {}   -- idempotency key -> {fingerprint, op number}: this call's keys

local function email_owner(key)
  local o = owner[key]
  if o == nil then
    o = redis.call('HGET', emails, key) or false
    owner[key] = o
  end
  return o
end

local function stored_version(id, user_key)
  local v = version[id]
  if v == nil then
    v = tonumber(redis.call('HGET', user_key, 'v')) or false
    version[id] = v
  end
  return v
end

local function partition_batch(partition)
  local batch = batches[partition]
  if not batch then
    local key = prefix .. 'log:' .. partition
    local last = tonumber(redis.call('HGET', offsets, partition) or 0)
    -- The stream's own last entry: XADD with an id at or below it would fail half-way, so
    -- offsets always continue past it, even if the offsets hash lost its field.
    local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)[1]
    if top then
      local top_offset = tonumber(string.match(top[1], '^(%d+)'))
      if top_offset > last then last = top_offset end
    end
    batch = {first = last + 1, last = last, events = {}, key = key,
             prev = redis.call('HGET', heads, partition) or ''}
    batches[partition] = batch
    order[#order + 1] = partition
  end
  return batch
end

-- An op whose idempotency key is known gets the key's outcome and is not decided further.
local function replayed(op)
  local name, fingerprint = op[9], op[10]
  if name == '' then return nil end
  local key = prefix .. 'idem:' .. name
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
  local old_email, new_email = op[4], op[5]
  local user_key = prefix .. 'user:' .. id
  local status, value = replayed(op)
  local stored = false
  if status then
    kind = 'replayed'
  else
    status, value = 0, 0
    stored = stored_version(id, user_key)
  end

  if kind == 'replayed' then
    -- decided above
  elseif kind == 'c' then
    if stored then
      status = 4
    elseif email_owner(new_email) then
      status = 2
    else
      owner[new_email] = id
      version[id] = 1
    end
  elseif not stored then
    status = 1
  elseif stored ~= expected then
    status, value = 3, stored
  elseif kind == 'u' then
    if new_email ~= old_email then
      local o = email_owner(new_email)
      if o and o ~= id then
        status = 2
      else
        owner[new_email] = id
        owner[old_email] = false
      end
    end
    if status == 0 then version[id] = expected + 1 end
  else
    version[id] = false
    owner[old_email] = false
  end

  if status == 0 then
    local batch = partition_batch(op[7])
    batch.last = batch.last + 1
    value = batch.last
    batch.events[#batch.events + 1] = op[8]
    applied[#applied + 1] = {op, user_key, value, batch}
    if op[9] ~= '' then claimed[prefix .. 'idem:' .. op[9]] = {op[10], i} end
  end
  out[#out + 1] = status
  out[#out + 1] = value
end

-- Phase 2: write. ---------------------------------------------------------------------------

if #applied == 0 then
  return out
end
if not epoch then
  redis.call('SET', epoch_key, ARGV[1])
end

local created = {}  -- ZADD arguments (score, member, ...) for the ids created
local tracked = {}  -- partition -> ZADD arguments (offset, id, ...) of its change offsets
for _, a in ipairs(applied) do
  local op, user_key, offset, batch = a[1], a[2], a[3], a[4]
  local kind, id, old_email, new_email = op[1], op[2], op[4], op[5]
  if kind == 'c' then
    redis.call('HSET', user_key, 'v', 1, 'd', op[6])
    redis.call('HSET', emails, new_email, id)
    created[#created + 1] = 0
    created[#created + 1] = id
  elseif kind == 'u' then
    if new_email ~= old_email then
      redis.call('HSET', emails, new_email, id)
      redis.call('HDEL', emails, old_email)
    end
    redis.call('HSET', user_key, 'v', op[3] + 1, 'd', op[6])
  else
    redis.call('DEL', user_key)
    redis.call('HDEL', emails, old_email)
    redis.call('ZREM', ids, id)
  end
  local p = op[7]
  if kind == 'd' then
    redis.call('ZREM', prefix .. 'chg:' .. p, id)
    redis.call('ZADD', prefix .. 'dead:' .. p, offset, id)
    redis.call('HSET', prefix .. 'tomb:' .. p, id, op[8])
  else
    -- Change offsets go in one ZADD per partition (below), as the ids do. (A call is
    -- creates, or one update or delete: no id is both tracked and deleted in one.)
    local t = tracked[p]
    if not t then
      t = {}
      tracked[p] = t
    end
    t[#t + 1] = offset
    t[#t + 1] = id
  end
  if op[9] ~= '' then
    redis.call('SET', prefix .. 'idem:' .. op[9],
               cmsgpack.pack({op[10], p, offset, out[1], op[8]}), 'PX', idem_window)
  end
  -- g: the tag of the write that made this entry, q: the tag of the write before it in this
  -- partition; a reader that knows the tag at its position can tell a continuation from a
  -- history that was replaced under the same offsets.
  redis.call('XADD', batch.key, 'MAXLEN', '~', maxlen, offset .. '-0', 'e', op[8], 't', now,
             'g', tag, 'q', batch.prev)
end

-- One ZADD per few hundred ids instead of one per id (unpack has a stack limit).
for first = 1, #created, 400 do
  redis.call('ZADD', ids, unpack(created, first, math.min(first + 399, #created)))
end
for partition, t in pairs(tracked) do
  for first = 1, #t, 400 do
    redis.call('ZADD', prefix .. 'chg:' .. partition, unpack(t, first, math.min(first + 399, #t)))
  end
end

-- Age limit: drop entries older than max_age from the head (a few per write keeps up), and
-- let a partition nobody writes to expire whole. Offsets live in their own hash, so a resume
-- from before the remaining history is detected, never silently skipped.
local function trim_by_age(key)
  redis.call('PEXPIRE', key, max_age)
  local head = redis.call('XRANGE', key, '-', '+', 'COUNT', 16)
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
    redis.call('XTRIM', key, 'MINID', keep)
  end
end

-- Tombstones older than the retention go from the oldest (a few per write keeps up); the
-- partition's floor moves past them, so a resync from before it is refused, not incomplete.
local function trim_tombstones(partition)
  local dead, tombs = prefix .. 'dead:' .. partition, prefix .. 'tomb:' .. partition
  local oldest = redis.call('ZRANGE', dead, 0, 7, 'WITHSCORES')
  local floor = nil
  for j = 1, #oldest, 2 do
    local event = redis.call('HGET', tombs, oldest[j])
    if event and cmsgpack.unpack(event)[3] >= (now - retention) * 1000 then break end
    redis.call('ZREM', dead, oldest[j])
    redis.call('HDEL', tombs, oldest[j])
    floor = oldest[j + 1]
  end
  if floor and tonumber(floor) > tonumber(redis.call('HGET', floors, partition) or 0) then
    redis.call('HSET', floors, partition, floor)
  end
end

-- Message: msgpack(epoch, partition, first offset, count, previous tag, tag) followed by the
-- events' msgpack, back to back: a listener that needs none of them skips the batch without
-- decoding it, yet still checks that it continues what it has.
for _, partition in ipairs(order) do
  local batch = batches[partition]
  redis.call('HSET', offsets, partition, batch.last)
  redis.call('HSET', heads, partition, tag)
  trim_by_age(batch.key)
  trim_tombstones(partition)
  redis.call('PUBLISH', prefix .. 'ev:' .. partition,
    cmsgpack.pack(out[1], partition, batch.first, #batch.events, batch.prev, tag)
    .. table.concat(batch.events))
end
return out
