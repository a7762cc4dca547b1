-- One atomic write of 1..n users: each op changes its record, the email index and the id index,
-- takes the next offset of its partition, appends its event to that partition's stream (the
-- history, bounded by length and age), and the events are PUBLISHed, one message per partition.
-- A refused op changes nothing and does not stop the others (bulk rows are independent).
--
-- KEYS: 1 email index (hash email_key -> id), 2 id index (zset, lex order), 3 offsets (hash
--       partition -> last offset), 4 epoch (string).
-- ARGV: 1 epoch to set if none exists, 2 history max length, 3 key prefix ("hub:"), 4 now (ms),
--       5 history max age (ms), 6 the ops, one msgpack array of
--       [kind (c/u/d), id, expected version, old email key, new email key, record, partition,
--        event].
-- The user keys ({prefix}user:{id}) and partition streams ({prefix}log:{p}) are derived here
-- rather than passed in KEYS: a bulk write touches hundreds, and passing each as an argument
-- costs more than the write itself. hub runs against one Redis (not a cluster), where that is
-- allowed.
-- Returns {epoch, status, value, status, value, ...}: status 0 ok (value: offset), 1 not found,
--       2 email taken, 3 version mismatch (value: stored version), 4 id taken.
local emails, ids, offsets, epoch_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, prefix = ARGV[2], ARGV[3]
local now, max_age = tonumber(ARGV[4]), tonumber(ARGV[5])
local ops = cmsgpack.unpack(ARGV[6])

local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', epoch_key, epoch)
end

local out = {epoch}
local batches, order = {}, {}
local created = {}  -- ZADD arguments (score, member, ...) for the ids created

for i = 1, #ops do
  local op = ops[i]
  local kind, id, expected = op[1], op[2], op[3]
  local old_email, new_email, record, partition = op[4], op[5], op[6], op[7]
  local user_key = prefix .. 'user:' .. id
  local status, value = 0, 0

  if kind == 'c' then
    if redis.call('EXISTS', user_key) == 1 then
      status = 4
    elseif redis.call('HSETNX', emails, new_email, id) == 0 then
      status = 2
    else
      redis.call('HSET', user_key, 'v', 1, 'd', record)
      created[#created + 1] = 0
      created[#created + 1] = id
    end
  else
    local stored = tonumber(redis.call('HGET', user_key, 'v'))
    if not stored then
      status = 1
    elseif stored ~= expected then
      status, value = 3, stored
    elseif kind == 'u' then
      if new_email ~= old_email then
        if redis.call('HSETNX', emails, new_email, id) == 0 then
          status = 2
        else
          redis.call('HDEL', emails, old_email)
        end
      end
      if status == 0 then
        redis.call('HSET', user_key, 'v', expected + 1, 'd', record)
      end
    else
      redis.call('DEL', user_key)
      redis.call('HDEL', emails, old_email)
      redis.call('ZREM', ids, id)
    end
  end

  if status == 0 then
    -- Offsets are read once per partition and written back once, after the loop.
    local batch = batches[partition]
    if not batch then
      local last = tonumber(redis.call('HGET', offsets, partition) or 0)
      batch = {first = last + 1, last = last, events = {},
               key = prefix .. 'log:' .. partition}
      batches[partition] = batch
      order[#order + 1] = partition
    end
    batch.last = batch.last + 1
    value = batch.last
    redis.call('XADD', batch.key, 'MAXLEN', '~', maxlen, value .. '-0', 'e', op[8], 't', now)
    batch.events[#batch.events + 1] = op[8]
  end
  out[#out + 1] = status
  out[#out + 1] = value
end

-- One ZADD per few hundred ids instead of one per id (unpack has a stack limit).
for first = 1, #created, 400 do
  redis.call('ZADD', ids, unpack(created, first, math.min(first + 399, #created)))
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

-- Message: msgpack(epoch, partition, first offset, count) followed by the events' msgpack,
-- back to back: a listener that needs none of them skips the batch without decoding it.
for _, partition in ipairs(order) do
  local batch = batches[partition]
  redis.call('HSET', offsets, partition, batch.last)
  trim_by_age(batch.key)
  redis.call('PUBLISH', prefix .. 'ev:' .. partition,
    cmsgpack.pack(epoch, partition, batch.first, #batch.events) .. table.concat(batch.events))
end
return out
