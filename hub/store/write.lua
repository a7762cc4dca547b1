-- One atomic write of 1..n users: each op changes its record, the email index and the id index,
-- takes the next offset of its partition, appends its event to that partition's stream (the
-- history, bounded by length), and the events are PUBLISHed, one message per partition.
-- A refused op changes nothing and does not stop the others (bulk rows are independent).
--
-- KEYS: 1 email index (hash email_key -> id), 2 id index (zset, lex order), 3 offsets (hash
--       partition -> last offset), 4 epoch (string), then one user key per op (hash: v version,
--       d record), then one stream key per partition used.
-- ARGV: 1 epoch to set if none exists, 2 history max length, 3 channel prefix, 4 op count,
--       5 now (ms), 6 history max age (ms), then 8 per op: kind (c/u/d), expected version, old email key, new email key,
--       record, partition, stream key index (into KEYS), event.
-- Returns {epoch, status, value, status, value, ...}: status 0 ok (value: offset), 1 not found,
--       2 email taken, 3 version mismatch (value: stored version), 4 id taken.
local emails, ids, offsets, epoch_key = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local maxlen, prefix, n = ARGV[2], ARGV[3], tonumber(ARGV[4])
local now, max_age = tonumber(ARGV[5]), tonumber(ARGV[6])

local epoch = redis.call('GET', epoch_key)
if not epoch then
  epoch = ARGV[1]
  redis.call('SET', epoch_key, epoch)
end

local out = {epoch}
local batches, order = {}, {}

for i = 0, n - 1 do
  local a = 7 + i * 8
  local kind, expected = ARGV[a], tonumber(ARGV[a + 1])
  local old_email, new_email, record = ARGV[a + 2], ARGV[a + 3], ARGV[a + 4]
  local partition, stream_key, event = ARGV[a + 5], KEYS[tonumber(ARGV[a + 6])], ARGV[a + 7]
  local user_key = KEYS[5 + i]
  local id = string.sub(user_key, string.len(user_key) - 25)
  local status, value = 0, 0

  if kind == 'c' then
    if redis.call('EXISTS', user_key) == 1 then
      status = 4
    elseif redis.call('HSETNX', emails, new_email, id) == 0 then
      status = 2
    else
      redis.call('HSET', user_key, 'v', 1, 'd', record)
      redis.call('ZADD', ids, 0, id)
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
    value = redis.call('HINCRBY', offsets, partition, 1)
    redis.call('XADD', stream_key, 'MAXLEN', '~', maxlen, value .. '-0', 'e', event, 't', now)
    local batch = batches[partition]
    if not batch then
      batch = {first = value, events = {}, key = stream_key}
      batches[partition] = batch
      order[#order + 1] = partition
    end
    batch.events[#batch.events + 1] = event
  end
  out[#out + 1] = status
  out[#out + 1] = value
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

-- Message: msgpack(epoch, partition, first offset) followed by the events' msgpack, back to back.
for _, partition in ipairs(order) do
  local batch = batches[partition]
  trim_by_age(batch.key)
  redis.call('PUBLISH', prefix .. partition,
    cmsgpack.pack(epoch, tonumber(partition), batch.first) .. table.concat(batch.events))
end
return out
