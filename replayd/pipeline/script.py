"""The commit script: it checks a commit's writes as Redis would, then runs them with the checkpoint fields, only
while the job's commit sequence is the one the committer last wrote (fencing). All of it, or nothing of it.

Arguments (`script_args`): KEYS[1] the checkpoint hash; ARGV: the seq field, the expected sequence, the new one, 2k,
the commands' argument counts (two bytes each), k checkpoint field/value pairs, then the commands' arguments back to
back (a count per command as an argument of its own cost Redis a string and a number more per command).

All or nothing. A check pass, before any write, follows the commands through the keys' types and stored counters as
the commands before them leave them, and returns the first one Redis would refuse (`{'refused', index, why}`), with
nothing written. Then the first write (the seq field set to its own value) is one Redis refuses for memory: Redis
refuses a script's writes for memory only up to its first one (6.2 and 7, scripts without flags), so either the
script is refused whole (OOM: retried as an outage) or every command runs. redis.call, not pcall: a refusal that
slipped through the check ends the script, the checkpoint unmoved, rather than being left out. A call from Lua takes
at most ~8,000 values: commands have at most MAX_ARGS arguments, and the checkpoint fields are set in parts.
`{'lost'}`: the hash (its seq field) is gone; `{'stale', seq}`: another commit moved the sequence.
"""

from __future__ import annotations

import struct
from typing import Any

from redis.exceptions import DataError as RedisDataError

from replayd.handlers import MAX_ARGS


class Refused(Exception):
    """Raised when the commit script refused command `index` of its commands before writing anything."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(reason)
        self.index = index
        self.reason = reason


def script_args(
    key: str, seq_field: str, expected: str, new: str, fields: dict[str, str], commands: list[tuple[Any, ...]]
) -> list[Any]:
    """What follows the script (EVAL) or its digest (EVALSHA): the key count, the key, the arguments.
    redis-py's DataError for a command the script cannot run (no arguments, or more than MAX_ARGS)."""
    if commands and not 0 < min(map(len, commands)) <= max(map(len, commands)) <= MAX_ARGS:
        raise RedisDataError("a command the commit script cannot run")
    counts = struct.pack(f">{len(commands)}H", *map(len, commands))
    args: list[Any] = [1, key, seq_field, expected, new, 2 * len(fields), counts]
    for item in fields.items():
        args.extend(item)
    for command in commands:
        args.extend(command)
    return args


COMMIT_SCRIPT = """
local current = redis.call('HGET', KEYS[1], ARGV[1])
if not current then
  if ARGV[2] ~= '' then return {'lost'} end
  current = ''
end
if current ~= ARGV[2] then return {'stale', current} end
local counts, first = ARGV[5], 6 + tonumber(ARGV[4])

local WRONGTYPE = 'WRONGTYPE Operation against a key holding the wrong kind of value'
local NOT_INT = 'ERR value is not an integer or out of range'
local OVERFLOW = 'ERR increment or decrement would overflow'
local types, fresh, gone, fields, strings, heads = {}, {}, {}, {}, {}, {}
-- the HSETs of a key whose fields no command has read yet, by position: the latest (sets[key]), each one's
-- predecessor (before[i]) and end (ends[i]); a command reading a field gathers them then, most keys are never read
local sets, before, ends = {}, {}, {}

local function typeof(key)
  local t = types[key]
  if t == nil then
    t = redis.call('TYPE', key)['ok']
    types[key] = t
  end
  return t
end

-- the type of a hash command's key: HLEN tells hash from none (a hash is never empty) for less than TYPE costs
local function hashtype(key)
  local t = types[key]
  if t == nil then
    local n = redis.pcall('HLEN', key)
    if type(n) == 'number' then
      if n > 0 then t = 'hash' else t = 'none' end
      types[key] = t
    else
      t = typeof(key)
    end
  end
  return t
end

local function kind(key, want)
  local t
  if want == 'hash' then t = hashtype(key) else t = typeof(key) end
  if t == want or t == 'none' then return nil end
  if gone[key] then return 'an earlier command of this commit may have emptied ' .. key .. ': its type is unknown' end
  return WRONGTYPE
end

local function integer(s)
  if type(s) == 'number' then
    if s == math.floor(s) then return s end
    return nil
  end
  local digits = string.match(s, '^%-?([1-9]%d*)$')
  if digits == nil then
    if s == '0' then return 0 end
    return nil
  end
  local most = string.sub(s, 1, 1) == '-' and '9223372036854775808' or '9223372036854775807'
  if #digits > 19 or (#digits == 19 and digits > most) then return nil end
  return tonumber(s)
end

-- integer(s), remembered (false: not one): a commit's increments and the counters it reads repeat a few values
local integers = {}
local function int(s)
  local v = integers[s]
  if v == nil then
    v = integer(s)
    if v == nil then v = false end
    if type(s) == 'string' then integers[s] = v end
  end
  if v == false then return nil end
  return v
end

local function float(s)
  if type(s) == 'number' then return s end
  local a, z = string.byte(s, 1), string.byte(s, -1)  -- a byte above 32 is no space: the patterns only when needed
  if not (a and a > 32 and z > 32) and (string.find(s, '^%s') or string.find(s, '%s$')) then return nil end
  local v = tonumber(s)
  if v == nil or v ~= v then return nil end
  return v
end

local function sum(a, b)
  local v = a + b
  if v >= 9.223372036854e18 or v <= -9.223372036854e18 then return nil end
  return v
end

local function emptied(key)
  types[key], fresh[key], gone[key], fields[key], strings[key], heads[key] = 'none', true, nil, {}, false, nil
  sets[key] = nil
end

local function made(key, t)
  if types[key] ~= t then types[key] = t end
  gone[key] = nil
end

local function field(key, f)
  local kv = fields[key]
  if kv == nil then
    kv = {}
    fields[key] = kv
    local i = sets[key]
    while i do  -- the latest HSET first, and in each its last pair first: what is set first is what stays
      for j = ends[i] - 1, i + 3, -2 do
        if kv[ARGV[j]] == nil then kv[ARGV[j]] = ARGV[j + 1] end
      end
      i = before[i]
    end
    sets[key] = nil
  end
  local v = kv[f]
  if v == nil then
    if fresh[key] or typeof(key) ~= 'hash' then v = false else v = redis.call('HGET', key, f) end
    kv[f] = v
  end
  return v, kv
end

-- kind(key, 'hash'), then field(key, f), for a command that reads field f and makes the hash: while the key's type
-- is unknown, one HGET reads the field and rules out another type (Redis would refuse it WRONGTYPE)
local function counter(key, f)
  if types[key] == nil then
    local v = redis.pcall('HGET', key, f)
    if type(v) ~= 'table' then
      types[key], fields[key] = 'hash', {[f] = v}  -- or none: the command makes the hash either way
    end
  end
  local e = kind(key, 'hash')
  if e then return nil, nil, e end
  return field(key, f)
end

local function stored(key)
  local v = strings[key]
  if v == nil then
    if fresh[key] or typeof(key) ~= 'string' then v = false else v = redis.call('GET', key) end
    strings[key] = v
  end
  return v
end

local function hset(i, n, key)
  if n < 4 or n % 2 ~= 0 then return 'ERR wrong number of arguments for HSET' end
  local e = kind(key, 'hash')
  if e then return e end
  local kv = fields[key]
  if kv then
    for j = i + 3, i + n, 2 do kv[ARGV[j]] = ARGV[j + 1] end
  else
    before[i], ends[i], sets[key] = sets[key], i + n, i
  end
  made(key, 'hash')
end

local function incr(key, by)
  if by == nil then return NOT_INT end
  local e = kind(key, 'string')
  if e then return e end
  local v = stored(key)
  if v == false then v = 0 else v = int(v) end
  if v == nil then return NOT_INT end
  v = sum(v, by)
  if v == nil then return OVERFLOW end
  strings[key] = v
  made(key, 'string')
end

local function members(t, min)
  return function(i, n, key)
    if n < min then return 'ERR wrong number of arguments' end
    local e = kind(key, t)
    if e then return e end
    made(key, t)
  end
end

local function removes(t)
  return function(i, n, key)
    if n < 3 then return 'ERR wrong number of arguments' end
    local e = kind(key, t)
    if e then return e end
    if types[key] ~= 'none' then gone[key] = true end
  end
end

local function expire(scale)
  return function(i, n, key)
    if n ~= 3 then return 'replayd checks EXPIRE and PEXPIRE without options only' end
    local t = int(ARGV[i + 3])
    if t == nil then return NOT_INT end
    if t * scale >= 9.2e18 or t * scale <= -9.2e18 then return 'ERR invalid expire time' end
    if t <= 0 then emptied(key) end
  end
end

local function id(s)
  local ms, seq = string.match(s, '^(%d+)%-(%d+)$')
  if ms == nil then
    ms, seq = string.match(s, '^(%d+)$'), '0'
    if ms == nil then return nil end
  end
  ms, seq = string.gsub(ms, '^0+(%d)', '%1'), string.gsub(seq, '^0+(%d)', '%1')
  local most = '18446744073709551615'
  if #ms > 20 or #seq > 20 or (#ms == 20 and ms > most) or (#seq == 20 and seq > most) then return nil end
  return {ms, seq}
end

local function below(a, b)  -- decimal digit strings without leading zeros
  if #a ~= #b then return #a < #b end
  return a < b
end

local function after(a, b)  -- ID a after ID b
  if a[1] ~= b[1] then return below(b[1], a[1]) end
  return below(b[2], a[2])
end

local function xadd(i, n, key)
  local j, last, create = i + 3, i + n, true
  local word = string.upper(ARGV[j] or '')
  if word == 'NOMKSTREAM' then
    create, j = false, j + 1
    word = string.upper(ARGV[j] or '')
  end
  if word == 'MAXLEN' or word == 'MINID' then
    j = j + 1
    if ARGV[j] == '=' or ARGV[j] == '~' then j = j + 1 end
    local threshold = ARGV[j] or ''
    if word == 'MAXLEN' then
      local m = int(threshold)
      if m == nil or m < 0 then return 'ERR The MAXLEN argument must be >= 0.' end
    elseif id(threshold) == nil then
      return 'ERR Invalid stream ID specified as stream command argument'
    end
    j = j + 1
    if string.upper(ARGV[j] or '') == 'LIMIT' then
      local m = int(ARGV[j + 1] or '')
      if m == nil or m < 0 then return 'ERR The LIMIT argument must be >= 0.' end
      j = j + 2
    end
  end
  if j > last or (last - j) % 2 ~= 0 or last - j < 2 then return 'ERR wrong number of arguments for XADD' end
  local e = kind(key, 'stream')
  if e then return e end
  local given = ARGV[j]
  if given ~= '*' then
    local wanted = id(given)
    if wanted == nil then return 'ERR Invalid stream ID specified as stream command argument' end
    if wanted[1] == '0' and wanted[2] == '0' then return 'ERR The ID specified in XADD must be greater than 0-0' end
    local top = heads[key]
    if top == nil then
      top = {'0', '0'}
      if typeof(key) == 'stream' then
        local info = redis.call('XINFO', 'STREAM', key)
        for k = 1, #info, 2 do
          if info[k] == 'last-generated-id' then top = id(info[k + 1]) end
        end
      end
    end
    if top == '*' then return 'an XADD with ID * came first in this commit: an explicit ID cannot be checked' end
    if not after(wanted, top) then
      return 'ERR The ID specified in XADD is equal or smaller than the target stream top item'
    end
    heads[key] = wanted
  else
    heads[key] = '*'
  end
  if create or typeof(key) ~= 'none' then made(key, 'stream') end
end

local rules = {
  HSET = hset,
  HMSET = hset,
  HSETNX = function(i, n, key)
    if n ~= 4 then return 'ERR wrong number of arguments for HSETNX' end
    local v, kv, e = counter(key, ARGV[i + 3])
    if e then return e end
    if v == false then kv[ARGV[i + 3]] = ARGV[i + 4] end
    made(key, 'hash')
  end,
  HINCRBY = function(i, n, key)
    if n ~= 4 then return 'ERR wrong number of arguments for HINCRBY' end
    local by = int(ARGV[i + 4])
    if by == nil then return NOT_INT end
    local v, kv, e = counter(key, ARGV[i + 3])
    if e then return e end
    if v == false then v = 0 else v = int(v) end
    if v == nil then return 'ERR hash value is not an integer' end
    v = sum(v, by)
    if v == nil then return OVERFLOW end
    kv[ARGV[i + 3]] = v
    made(key, 'hash')
  end,
  HINCRBYFLOAT = function(i, n, key)
    if n ~= 4 then return 'ERR wrong number of arguments for HINCRBYFLOAT' end
    local by = float(ARGV[i + 4])
    if by == nil then return 'ERR value is not a valid float' end
    local v, kv, e = counter(key, ARGV[i + 3])
    if e then return e end
    if v == false then v = 0 else v = float(v) end
    if v == nil then return 'ERR hash value is not a float' end
    v = v + by
    if v ~= v or v == math.huge or v == -math.huge then return 'ERR increment would produce NaN or Infinity' end
    kv[ARGV[i + 3]] = v
    made(key, 'hash')
  end,
  HDEL = function(i, n, key)
    if n < 3 then return 'ERR wrong number of arguments for HDEL' end
    local e = kind(key, 'hash')
    if e then return e end
    if types[key] ~= 'none' then
      for j = i + 3, i + n do
        local _, kv = field(key, ARGV[j])
        kv[ARGV[j]] = false
      end
      gone[key] = true
    end
  end,
  SET = function(i, n, key)
    if n < 3 then return 'ERR wrong number of arguments for SET' end
    local nx, xx, j = false, false, i + 4
    while j <= i + n do
      local word = string.upper(ARGV[j])
      if word == 'EX' or word == 'PX' then
        local t = int(ARGV[j + 1] or '')
        if t == nil or t <= 0 or t >= 9.2e15 then return "ERR invalid expire time in 'set' command" end
        j = j + 2
      elseif word == 'NX' then nx, j = true, j + 1
      elseif word == 'XX' then xx, j = true, j + 1
      elseif word == 'KEEPTTL' then j = j + 1
      else return 'replayd checks SET with EX, PX, NX, XX and KEEPTTL only' end
    end
    if nx and xx then return 'ERR syntax error' end
    local t = typeof(key)
    if (nx and t ~= 'none') or (xx and t == 'none') then return nil end
    emptied(key)
    strings[key] = ARGV[i + 3]
    made(key, 'string')
  end,
  INCR = function(i, n, key)
    if n ~= 2 then return 'ERR wrong number of arguments for INCR' end
    return incr(key, 1)
  end,
  DECR = function(i, n, key)
    if n ~= 2 then return 'ERR wrong number of arguments for DECR' end
    return incr(key, -1)
  end,
  INCRBY = function(i, n, key)
    if n ~= 3 then return 'ERR wrong number of arguments for INCRBY' end
    return incr(key, int(ARGV[i + 3]))
  end,
  DECRBY = function(i, n, key)
    if n ~= 3 then return 'ERR wrong number of arguments for DECRBY' end
    local by = int(ARGV[i + 3])
    return incr(key, by and -by)
  end,
  DEL = function(i, n, key)
    if n < 2 then return 'ERR wrong number of arguments for DEL' end
    for j = i + 2, i + n do emptied(ARGV[j]) end
  end,
  SADD = members('set', 3),
  RPUSH = members('list', 3),
  LPUSH = members('list', 3),
  SREM = removes('set'),
  ZREM = removes('zset'),
  ZADD = function(i, n, key)
    local j, flags = i + 3, {}
    while j <= i + n do
      local word = string.upper(ARGV[j])
      if word == 'NX' or word == 'XX' or word == 'GT' or word == 'LT' or word == 'CH' then
        flags[word], j = true, j + 1
      elseif word == 'INCR' then return 'replayd checks ZADD without INCR only (ZINCRBY is checked)'
      else break end
    end
    if (flags.NX and (flags.XX or flags.GT or flags.LT)) or (flags.GT and flags.LT) then
      return 'ERR GT, LT, and/or NX options at the same time are not compatible'
    end
    if j > i + n or (i + n - j + 1) % 2 ~= 0 then return 'ERR syntax error' end
    for k = j, i + n, 2 do
      if float(ARGV[k]) == nil then return 'ERR value is not a valid float' end
    end
    local e = kind(key, 'zset')
    if e then return e end
    if not flags.XX or typeof(key) ~= 'none' then made(key, 'zset') end
  end,
  ZINCRBY = function(i, n, key)
    if n ~= 4 then return 'ERR wrong number of arguments for ZINCRBY' end
    if float(ARGV[i + 3]) == nil then return 'ERR value is not a valid float' end
    local e = kind(key, 'zset')
    if e then return e end
    made(key, 'zset')
  end,
  EXPIRE = expire(1000),
  PEXPIRE = expire(1),
  XADD = xadd,
}
rules.UNLINK = rules.DEL

-- the commands' arguments lie back to back from ARGV[first]; counts holds each one's count in two bytes. A rule
-- is given i, the position before the command's name: ARGV[i + 1] the name, ARGV[i + 2] the key, up to ARGV[i + n]
local index, i = 0, first - 1
for c = 1, #counts, 2 do
  local high, low = string.byte(counts, c, c + 1)
  local n = high * 256 + low
  local name = ARGV[i + 1]
  local rule = rules[name] or rules[string.upper(name)]
  local refusal
  if rule == nil then
    refusal = 'replayd does not check ' .. name .. ' before a commit: queue it with ctx.tx methods'
  elseif n < 2 then
    refusal = 'ERR wrong number of arguments for ' .. name
  else
    refusal = rule(i, n, ARGV[i + 2])
  end
  if refusal then return {'refused', index, refusal} end
  index = index + 1
  i = i + n
end

-- the first write, before any command of the handlers: Redis refuses a script's writes for memory only up to its
-- first write (the seq field keeps its value)
redis.call('HSET', KEYS[1], ARGV[1], current)
i = first - 1
for c = 1, #counts, 2 do
  local high, low = string.byte(counts, c, c + 1)
  redis.call(unpack(ARGV, i + 1, i + high * 256 + low))
  i = i + high * 256 + low
end
for j = 6, first - 1, 4000 do redis.call('HSET', KEYS[1], unpack(ARGV, j, math.min(j + 3999, first - 1))) end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return {'ok'}
"""
