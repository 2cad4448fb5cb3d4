"""Rate limits per API key and per user: requests per minute and tokens per minute, shared through Redis.

Requests are counted in a sliding window (a sorted set of admission times per key or user), so "20 per minute" never
admits a 21st request inside any 60 s, even across a minute boundary or across gateway processes. Tokens are counted
in fixed one-minute windows (a hash field per window) and settled after the answer from the usage the llm service
reports: a request is admitted while the window's count is under the limit, and its tokens are added afterwards.

One EVALSHA checks and counts every applicable limit of a request at once; requests that arrive while a check is in
flight are checked together in the next one (a `Coalescer`: a lone request goes at once, under load a round trip serves
many). Tokens settled after answers are summed per key in the process and written every `settle_interval` s in one
EVALSHA for all of them, so a request costs at most one Redis round trip, not two; a token limit sees usage that late
(50 ms by default, against a 60 s window). Redis down: refuse (503, "closed") or admit ("open"), and the degraded
gauge says so.

Leases, for limits large enough to share: a process that keeps coming back for the same scopes asks for more than one
admission at once (doubling while it uses them up within `LEASE_SECONDS`, at most 1/`LEASE_SHARE` of the smallest
request limit) and admits the next requests from the lease without a round trip. The lease's admissions are counted in
Redis when granted, scored at the end of the lease so none leaves the window early: a limit is never exceeded, and one
process's unused admissions are given back (ZREM) with the next settlement after its lease ends. A request limit under
2 x `LEASE_SHARE` (or a scope with no request limit) never leases: each request is checked as it comes. A lease
admits without looking at the token count again, so a token limit sees usage up to `LEASE_SECONDS` +
`settle_interval` late. A lease's headers count this process's admissions only, and a 429 answered while another
process holds unused admissions tells the client to retry when the oldest admission leaves the window, though room
may come back within `LEASE_SECONDS` + `settle_interval`. A lease check whose answer is lost (a timeout, a reset)
gives back whatever it may have been granted, as an unused lease does.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import re
import threading
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Protocol

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from parley_kit.batching import Coalescer
from parley_kit.errors import RateLimited, ServiceUnavailable

from .metrics import RATELIMIT_DECISIONS, RATELIMIT_DEGRADED

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
# A lease lasts this long, and holds at most 1/LEASE_SHARE of any of its request limits (never more than LEASE_MAX:
# the script passes two values per admission to one ZADD, and Lua's unpack takes ~8,000).
LEASE_SECONDS = 0.1
LEASE_SHARE = 50
LEASE_MAX = 1000
LEASE_FORGET_SECONDS = 1.0  # an ended lease is forgotten after this long without a new one
MAX_UNUSED = 100_000  # lease admissions waiting to be given back (Redis away); past it they age out of the window
# After a Redis failure, requests skip Redis for this long (a black-holed Redis must not cost each request a timeout).
REDIS_RETRY_AFTER = 1.0

# Checks a batch of requests in arrival order (each sees the ones before it counted), as one atomic step.
# KEYS: per request, per scope: its request log (sorted set) then its token windows (hash).
# ARGV: window (ms), lease hold (ms), the number of requests, then per request: a unique member, its number of scopes,
# the admissions it asks for (1, or more for a lease), and per scope rpm, tpm (0 = off).
# An admitted request is granted as many admissions as it asked for and every request limit has room for (at least
# its own). One asked for alone is the member itself, scored now; a lease's are `member:1` … `member:granted`, scored
# at the end of the lease's hold.
# Returns, per request: limited, kind (1 requests, 2 tokens), retry_ms, token_reset_ms, granted, then per scope:
# used_req, reset_req_ms, used_tok.
CHECK_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local hold = tonumber(ARGV[2])
local slot = math.floor(now / window)
local token_reset = (slot + 1) * window - now
local result = {}
local a, k = 4, 0
for _ = 1, tonumber(ARGV[3]) do
  local member, scopes, want = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  a = a + 3
  local limited, kind, retry = 0, 0, 0
  local out = {}
  for i = 1, scopes do
    local rpm, tpm = tonumber(ARGV[a + 2 * i - 2]), tonumber(ARGV[a + 2 * i - 1])
    local used_req, reset_req, used_tok = 0, 0, 0
    if rpm > 0 then
      local log_key = KEYS[k + 2 * i - 1]
      redis.call('ZREMRANGEBYSCORE', log_key, '-inf', now - window)
      used_req = redis.call('ZCARD', log_key)
      if used_req > 0 then
        local oldest = redis.call('ZRANGE', log_key, 0, 0, 'WITHSCORES')
        reset_req = tonumber(oldest[2]) + window - now
      end
      if used_req >= rpm then
        limited, kind, retry = 1, 1, math.max(retry, reset_req)
      end
    end
    if tpm > 0 then
      used_tok = tonumber(redis.call('HGET', KEYS[k + 2 * i], slot) or '0')
      if used_tok >= tpm then
        limited, retry = 1, math.max(retry, token_reset)
        if kind == 0 then kind = 2 end
      end
    end
    out[#out + 1] = used_req
    out[#out + 1] = reset_req
    out[#out + 1] = used_tok
  end
  local granted = 0
  if limited == 0 then
    granted = want
    for i = 1, scopes do
      local rpm = tonumber(ARGV[a + 2 * i - 2])
      if rpm > 0 then granted = math.min(granted, rpm - out[3 * i - 2]) end
    end
    for i = 1, scopes do
      if tonumber(ARGV[a + 2 * i - 2]) > 0 then
        local log_key = KEYS[k + 2 * i - 1]
        if want == 1 then
          redis.call('ZADD', log_key, now, member)
        else
          local admissions = {}
          for j = 1, granted do
            admissions[#admissions + 1] = now + hold
            admissions[#admissions + 1] = member .. ':' .. j
          end
          redis.call('ZADD', log_key, unpack(admissions))
        end
        redis.call('PEXPIRE', log_key, window + hold)
      end
    end
  end
  result[#result + 1] = limited
  result[#result + 1] = kind
  result[#result + 1] = retry
  result[#result + 1] = token_reset
  result[#result + 1] = granted
  for _, value in ipairs(out) do result[#result + 1] = value end
  a = a + 2 * scopes
  k = k + 2 * scopes
end
return result
"""

# KEYS: token window hashes. ARGV: window (ms), then the tokens for each key. Older windows are dropped as the current
# one is written.
SETTLE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local slot = math.floor(now / window)
for i, key in ipairs(KEYS) do
  redis.call('HINCRBY', key, slot, ARGV[1 + i])
  if redis.call('HLEN', key) > 1 then
    for _, field in ipairs(redis.call('HKEYS', key)) do
      if tonumber(field) < slot then redis.call('HDEL', key, field) end
    end
  end
  redis.call('PEXPIRE', key, window * 2)
end
return 1
"""


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request acts as, for limiting: the user, the API key (if any) and limits the token itself carries."""

    user_id: str
    key_id: str | None = None
    rpm: int | None = None
    tpm: int | None = None


@dataclass(frozen=True, slots=True)
class Scope:
    """One limited subject (a key or a user) with its limits (0 = off)."""

    kind: str  # "key" | "user"
    subject: str
    rpm: int
    tpm: int


@dataclass(frozen=True, slots=True)
class DefaultLimits:
    """The limits from settings, per key and per user."""

    key_rpm: int
    key_tpm: int
    user_rpm: int
    user_tpm: int

    def scopes(self, principal: Principal) -> tuple[Scope, ...]:
        """The limits that apply to this principal: its key's (if any) and its user's; token claims override."""
        scopes = []
        if principal.key_id is not None:
            rpm = principal.rpm if principal.rpm is not None else self.key_rpm
            tpm = principal.tpm if principal.tpm is not None else self.key_tpm
            scopes.append(Scope("key", principal.key_id, rpm, tpm))
            user_rpm, user_tpm = self.user_rpm, self.user_tpm
        else:
            user_rpm = principal.rpm if principal.rpm is not None else self.user_rpm
            user_tpm = principal.tpm if principal.tpm is not None else self.user_tpm
        scopes.append(Scope("user", principal.user_id, user_rpm, user_tpm))
        return tuple(scope for scope in scopes if scope.rpm or scope.tpm)


@dataclass(slots=True)
class Decision:
    """An admitted request: the headers to add to its answer and the scopes its tokens are settled on."""

    headers: list[tuple[str, str]]
    token_scopes: tuple[Scope, ...]


class RateLimiter(Protocol):
    """Checks and counts a request against its scopes; settles tokens after the answer."""

    def admit(self, scopes: tuple[Scope, ...]) -> Decision:
        """Count the request or raise RateLimited (429) / ServiceUnavailable (503 when limits cannot be checked)."""
        ...

    def settle(self, scopes: tuple[Scope, ...], tokens: int) -> None:
        """Add the tokens a request used to its scopes' current windows."""
        ...

    def close(self) -> None:
        """Write what is still pending and stop background work."""
        ...


def decide(
    scopes: tuple[Scope, ...],
    *,
    limited: bool,
    kind: int,
    retry_ms: float,
    token_reset_ms: float,
    usage: list[tuple[int, float, int]],
) -> Decision:
    """Turn the counters into a Decision or a RateLimited error with OpenAI-style headers (tightest scope wins)."""
    headers = rate_limit_headers(scopes, usage, token_reset_ms, admitted=not limited)
    if limited:
        what = "requests" if kind == 1 else "tokens"
        RATELIMIT_DECISIONS.labels("limited", what).inc()
        retry_after = max(1, math.ceil(retry_ms / 1000))
        raise RateLimited(
            f"rate limit reached for {what} per minute; retry in {retry_after}s",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry_after), **dict(headers)},
        )
    if any(scope.rpm for scope in scopes):
        RATELIMIT_DECISIONS.labels("allowed", "requests").inc()
    if any(scope.tpm for scope in scopes):
        RATELIMIT_DECISIONS.labels("allowed", "tokens").inc()
    return Decision(headers, tuple(scope for scope in scopes if scope.tpm))


def rate_limit_headers(
    scopes: tuple[Scope, ...], usage: list[tuple[int, float, int]], token_reset_ms: float, *, admitted: bool
) -> list[tuple[str, str]]:
    """`x-ratelimit-{limit,remaining,reset}-{requests,tokens}` for the scope with the least left of each kind."""
    headers: list[tuple[str, str]] = []
    requests = [
        (scope.rpm - used - (1 if admitted else 0), scope.rpm, reset if reset or not admitted else WINDOW_MS)
        for scope, (used, reset, _tokens) in zip(scopes, usage, strict=True)
        if scope.rpm
    ]
    if requests:
        remaining, limit, reset = min(requests)
        headers += [
            ("x-ratelimit-limit-requests", str(limit)),
            ("x-ratelimit-remaining-requests", str(max(0, remaining))),
            ("x-ratelimit-reset-requests", duration(reset)),
        ]
    tokens = [
        (scope.tpm - used_tokens, scope.tpm)
        for scope, (_used, _reset, used_tokens) in zip(scopes, usage, strict=True)
        if scope.tpm
    ]
    if tokens:
        remaining, limit = min(tokens)
        headers += [
            ("x-ratelimit-limit-tokens", str(limit)),
            ("x-ratelimit-remaining-tokens", str(max(0, remaining))),
            ("x-ratelimit-reset-tokens", duration(token_reset_ms)),
        ]
    return headers


def duration(milliseconds: float) -> str:
    """A reset time as OpenAI writes it: `850ms`, `12s`, `1m30s`."""
    if milliseconds < 1000:
        return f"{max(0, int(milliseconds))}ms"
    seconds = math.ceil(milliseconds / 1000)
    minutes, seconds = divmod(seconds, 60)
    return f"{minutes}m{seconds}s" if minutes else f"{seconds}s"


class Lease:
    """Admissions granted to this process for one set of scopes, already counted in Redis."""

    __slots__ = ("expires", "granted", "granted_at", "left", "member", "token_reset_ms", "usage", "used")

    def __init__(
        self,
        *,
        member: str,
        granted: int,
        granted_at: float,
        usage: list[tuple[int, float, int]],
        token_reset_ms: float,
    ) -> None:
        self.member = member  # its admissions in Redis are `member:1` … `member:granted`
        self.granted = granted
        self.used = 1  # the request that asked for it took the first
        self.left = granted - 1  # zero once used up or given back
        self.granted_at = granted_at
        self.expires = granted_at + LEASE_SECONDS
        self.usage = usage  # per scope, as the check that granted it saw them
        self.token_reset_ms = token_reset_ms

    def take(self, scopes: tuple[Scope, ...], now: float) -> Decision:
        """Admit one more request (the caller holds the limiter's lock); its headers as this process sees the
        window."""
        self.left -= 1
        taken = self.used
        self.used += 1
        elapsed_ms = (now - self.granted_at) * 1000
        usage = [
            (used + taken, max(0.0, reset - elapsed_ms) if reset else 0.0, used_tokens)
            for used, reset, used_tokens in self.usage
        ]
        return decide(
            scopes,
            limited=False,
            kind=0,
            retry_ms=0,
            token_reset_ms=max(0.0, self.token_reset_ms - elapsed_ms),
            usage=usage,
        )

    def next_size(self, now: float, cap: int) -> int:
        """How many admissions to ask for next: twice this lease if it was used up before it ended, else as many as
        it served; within the scopes' cap."""
        wanted = 2 * self.granted if self.used >= self.granted and now < self.expires else self.used
        return max(1, min(wanted, cap))


def lease_cap(scopes: tuple[Scope, ...]) -> int:
    """The most admissions one lease may hold for these scopes (1: no lease; so without any request limit, as a
    lease of tokens alone would reserve nothing and only skip the token check)."""
    shares = [max(1, scope.rpm // LEASE_SHARE) for scope in scopes if scope.rpm]
    return min([LEASE_MAX, *shares]) if shares else 1


def _members(member: str, first: int, last: int) -> list[str]:
    """A lease's admissions `member:first` … `member:last` in the request logs."""
    return [f"{member}:{n}" for n in range(first, last + 1)]


class RedisRateLimiter:
    """Limits shared by every gateway process through one Redis (checks and settlements batched, leases for limits
    large enough to share)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        timeout: float,
        failure_mode: str,
        pool_size: int = 64,
        pool_wait: float = 5.0,
        settle_interval: float = 0.05,
    ) -> None:
        # No retries and short timeouts: a slow Redis must not become a slow gateway. A blocking pool: more checks in
        # flight than connections (thousands of greenlets per worker) wait their turn; the default pool would raise
        # "too many connections", which reads as Redis being down and fails every request closed for a second.
        pool = redis.BlockingConnectionPool.from_url(
            url,
            max_connections=pool_size,
            timeout=pool_wait,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )
        self._redis = redis.Redis(connection_pool=pool)
        self._prefix = prefix
        self._fail_open = failure_mode == "open"
        # Checks go one batch at a time (the coalescer), so one connection of their own carries them: no pool checkout,
        # no wrapper layers per call (those were a third of the check's CPU in a gateway worker's profile).
        self._check_sha = self._redis.register_script(CHECK_SCRIPT).sha
        self._check_connection = pool.make_connection()
        weakref.finalize(self, self._check_connection.disconnect)  # as the pool's own connections are
        self._checks: Coalescer[tuple[tuple[Scope, ...], str, int], list[int]] = Coalescer(self._check_batch)
        self._settle = self._redis.register_script(SETTLE_SCRIPT)
        self._degraded = False
        self._skip_until = 0.0
        self._settle_interval = settle_interval
        self._unsettled: dict[str, int] = {}  # token window key -> tokens not yet written
        self._leases: dict[tuple[Scope, ...], Lease] = {}
        self._leasing: set[tuple[Scope, ...]] = set()  # scopes whose next lease is being asked for
        self._unused: dict[str, list[str]] = {}  # request log key -> lease members to give back
        self._unused_count = 0  # members in `_unused`, all keys together (bounded by MAX_UNUSED)
        self._lock = threading.Lock()
        self._settler_pid = 0  # the process whose settler thread runs (a forked worker starts its own)
        self._closed = threading.Event()

    def ping(self) -> None:
        """Readiness: raise when Redis does not answer."""
        self._redis.ping()

    def admit(self, scopes: tuple[Scope, ...]) -> Decision:
        """Admit from this process's lease for these scopes, or check and count every scope in one round trip
        (shared with the requests checked alongside). One check at a time per scopes asks for the next lease (the
        others count only themselves), so concurrent requests never reserve more than one lease's worth."""
        now = time.monotonic()
        leasing = False
        with self._lock:
            lease = self._leases.get(scopes)
            if lease is not None and lease.left > 0 and now < lease.expires:
                return lease.take(scopes, now)
            cap = lease_cap(scopes)
            if cap > 1 and scopes not in self._leasing:
                leasing = True
                self._leasing.add(scopes)
        try:
            if self._skip_until > now:
                return self._unavailable()
            want = lease.next_size(now, cap) if leasing and lease is not None else 1
            member = uuid.uuid4().hex
            try:
                result = self._checks((scopes, member, want))
            except BaseException as exc:
                if want > 1:  # Redis may have granted the lease before its answer was lost: give all of it back
                    self._give_back_members(scopes, _members(member, 1, want))
                if isinstance(exc, redis.RedisError):
                    return self._failed(exc)
                raise
            self._recovered()
            limited, kind, retry_ms, token_reset_ms, granted = result[:5]  # Redis added `granted`, no more
            usage = [(result[i], float(result[i + 1]), result[i + 2]) for i in range(5, len(result), 3)]
            decision = decide(
                scopes, limited=bool(limited), kind=kind, retry_ms=retry_ms, token_reset_ms=token_reset_ms, usage=usage
            )
            if leasing:  # kept even when it holds only this request: the next lease's size grows from it
                fresh = Lease(
                    member=member, granted=granted, granted_at=now, usage=usage, token_reset_ms=token_reset_ms
                )
                with self._lock:
                    old = self._leases.get(scopes)
                    self._leases[scopes] = fresh
                    if old is not None and old.left > 0:
                        self._give_back(scopes, old)
                self._start_settler()
            return decision
        finally:
            if leasing:
                with self._lock:
                    self._leasing.discard(scopes)

    def _check_batch(self, batch: list[tuple[tuple[Scope, ...], str, int]]) -> list[list[int]]:
        """One EVALSHA for every request in the batch; each request's slice of the answer."""
        keys: list[str] = []
        args: list[int | str] = [WINDOW_MS, int(LEASE_SECONDS * 1000), len(batch)]
        for scopes, member, want in batch:
            args += [member, len(scopes), want]
            for scope in scopes:
                keys += [self._key(scope, "req"), self._key(scope, "tok")]
                args += [scope.rpm, scope.tpm]
        flat = [int(value) for value in self._check(keys, args)]
        answers, start = [], 0
        for scopes, _member, _want in batch:
            end = start + 5 + 3 * len(scopes)
            answers.append(flat[start:end])
            start = end
        return answers

    def _check(self, keys: list[str], args: list[int | str]) -> list[int]:
        """EVALSHA the check script on the checks' own connection; loaded first when Redis does not know it yet."""
        connection = self._check_connection

        def evalsha() -> list[int]:
            connection.send_command("EVALSHA", self._check_sha, len(keys), *keys, *args)
            return connection.read_response()  # type: ignore[no-any-return]

        try:
            try:
                return evalsha()
            except redis.exceptions.NoScriptError:
                connection.send_command("SCRIPT", "LOAD", CHECK_SCRIPT)
                connection.read_response()
                return evalsha()
        except redis.ResponseError:
            raise  # an error answer, read whole: the connection is still in step
        except BaseException:
            # A timeout, a broken connection, or this greenlet killed mid-call: an answer may be left unread, and it
            # must never be read as the next check's.
            connection.disconnect()
            raise

    def settle(self, scopes: tuple[Scope, ...], tokens: int) -> None:
        """Count the tokens against each scope; they reach Redis with the next batch (at most `settle_interval` s)."""
        if tokens <= 0 or not scopes:
            return
        with self._lock:
            for scope in scopes:
                key = self._key(scope, "tok")
                self._unsettled[key] = self._unsettled.get(key, 0) + tokens
        self._start_settler()

    def _start_settler(self) -> None:
        """The settler thread of this process (a forked worker starts its own)."""
        with self._lock:
            if self._settler_pid == os.getpid():
                return
            self._settler_pid = os.getpid()
        threading.Thread(target=self._settle_every_interval, name="token-settler", daemon=True).start()
        atexit.register(self.close)  # a worker's last counts are written, its unused admissions given back, at exit

    def _give_back(self, scopes: tuple[Scope, ...], lease: Lease) -> None:
        """Queue a lease's unused admissions for removal from the request logs (under the limiter's lock)."""
        members = _members(lease.member, 1, lease.left)  # all scored alike: which ones is moot
        lease.left = 0
        self._queue_unused(scopes, members)

    def _give_back_members(self, scopes: tuple[Scope, ...], members: list[str]) -> None:
        """Queue admissions of a check that were not used, whether or not Redis holds them (removing none is moot)."""
        with self._lock:
            self._queue_unused(scopes, members)
        self._start_settler()

    def _queue_unused(self, scopes: tuple[Scope, ...], members: list[str]) -> None:
        if self._unused_count >= MAX_UNUSED:
            return  # Redis has been away long: these leave the window by themselves within a minute
        for scope in scopes:
            if scope.rpm:
                self._unused.setdefault(self._key(scope, "req"), []).extend(members)
                self._unused_count += len(members)

    def flush(self, *, every_lease: bool = False) -> None:
        """Write every unsettled count, then give back the unused admissions of ended leases (all leases when
        `every_lease`); a failure is logged (the answers have already gone out), and admissions not given back are
        kept for the next flush."""
        now = time.monotonic()
        with self._lock:
            for scopes, lease in list(self._leases.items()):
                if every_lease or now >= lease.expires:
                    if lease.left > 0:
                        self._give_back(scopes, lease)
                    if every_lease or now >= lease.expires + LEASE_FORGET_SECONDS:  # kept a while to size the next
                        del self._leases[scopes]
            batch, self._unsettled = self._unsettled, {}
            unused, self._unused, self._unused_count = self._unused, {}, 0
        if not (batch or unused):
            return
        if self._skip_until > time.monotonic():
            self._keep_unused(unused)
            return
        if batch:
            try:
                self._settle(keys=list(batch), args=[WINDOW_MS, *batch.values()])
            except redis.RedisError as exc:
                log.warning("could not settle tokens in Redis", extra={"error.type": type(exc).__name__})
        if unused:
            try:
                with self._redis.pipeline(transaction=False) as pipe:
                    for key, members in unused.items():
                        pipe.zrem(key, *members)
                    pipe.execute()
            except redis.RedisError as exc:
                log.warning("could not give back leased admissions in Redis", extra={"error.type": type(exc).__name__})
                self._keep_unused(unused)

    def _keep_unused(self, unused: dict[str, list[str]]) -> None:
        """Put admissions that could not be given back in front of the queue again (within MAX_UNUSED)."""
        with self._lock:
            for key, members in unused.items():
                if self._unused_count + len(members) > MAX_UNUSED:
                    return
                self._unused.setdefault(key, [])[:0] = members
                self._unused_count += len(members)

    def close(self) -> None:
        """Write what is unsettled, give back every lease's unused admissions, stop the settler and close the checks'
        connection."""
        self._closed.set()
        self.flush(every_lease=True)
        self._check_connection.disconnect()

    def _settle_every_interval(self) -> None:
        while not self._closed.wait(self._settle_interval):
            self.flush()

    def _key(self, scope: Scope, what: str) -> str:
        return f"{self._prefix}ratelimit:{scope.kind}:{scope.subject}:{what}"

    def _failed(self, exc: Exception) -> Decision:
        self._skip_until = time.monotonic() + REDIS_RETRY_AFTER
        if not self._degraded:
            self._degraded = True
            RATELIMIT_DEGRADED.set(1)
            log.error("Redis is unreachable: rate limits are degraded", extra={"error.type": type(exc).__name__})
        return self._unavailable()

    def _unavailable(self) -> Decision:
        if self._fail_open:
            return Decision([], ())
        raise ServiceUnavailable("rate limits cannot be checked right now; retry shortly", headers={"Retry-After": "1"})

    def _recovered(self) -> None:
        if self._degraded:
            self._degraded = False
            RATELIMIT_DEGRADED.set(0)
            log.warning("Redis answers again: rate limits are enforced")


class LocalRateLimiter:
    """The same limits kept in this process only (`make run` without Redis): each process counts on its own."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str], deque[float]] = {}
        self._tokens: dict[tuple[str, str], tuple[int, int]] = {}  # (kind, subject) -> (window, tokens)
        self._lock = threading.Lock()

    def admit(self, scopes: tuple[Scope, ...]) -> Decision:
        """Check and count under a lock (the process's own atomic step)."""
        now = time.time() * 1000
        slot = int(now // WINDOW_MS)
        token_reset = (slot + 1) * WINDOW_MS - now
        limited, kind, retry = False, 0, 0.0
        usage = []
        with self._lock:
            for scope in scopes:
                used_req, reset_req, used_tok = 0, 0.0, 0
                times = self._requests.setdefault((scope.kind, scope.subject), deque())
                if scope.rpm:
                    while times and times[0] <= now - WINDOW_MS:
                        times.popleft()
                    used_req = len(times)
                    reset_req = times[0] + WINDOW_MS - now if times else 0.0
                    if used_req >= scope.rpm:
                        limited, kind, retry = True, 1, max(retry, reset_req)
                if scope.tpm:
                    window, count = self._tokens.get((scope.kind, scope.subject), (slot, 0))
                    used_tok = count if window == slot else 0
                    if used_tok >= scope.tpm:
                        limited, retry = True, max(retry, token_reset)
                        kind = kind or 2
                usage.append((used_req, reset_req, used_tok))
            if not limited:
                for scope in scopes:
                    if scope.rpm:
                        self._requests[(scope.kind, scope.subject)].append(now)
        return decide(scopes, limited=limited, kind=kind, retry_ms=retry, token_reset_ms=token_reset, usage=usage)

    def settle(self, scopes: tuple[Scope, ...], tokens: int) -> None:
        """Add the tokens to the current window."""
        if tokens <= 0:
            return
        slot = int(time.time() * 1000 // WINDOW_MS)
        with self._lock:
            for scope in scopes:
                window, count = self._tokens.get((scope.kind, scope.subject), (slot, 0))
                self._tokens[(scope.kind, scope.subject)] = (slot, (count if window == slot else 0) + tokens)

    def close(self) -> None:
        """Nothing is pending: settlements are counted at once."""


_USAGE = re.compile(rb'"(prompt_tokens|completion_tokens|total_tokens|input_tokens|output_tokens)"\s*:\s*(\d+)')
_TAIL = 64


class UsageMeter:
    """Finds the usage an answer reports, as its bytes pass: OpenAI `usage` (JSON or the last SSE chunk) or Anthropic
    `message_start`/`message_delta` (cumulative). Only the last value of each counter counts, so a counter split across
    two chunks or seen twice never counts double. Without any usage (a stream whose client did not ask for it), the
    tokens are estimated: a quarter of the request body's bytes plus one per streamed delta."""

    __slots__ = ("_deltas", "_request_bytes", "_seen", "_tail")

    def __init__(self, request_bytes: int) -> None:
        self._request_bytes = request_bytes
        self._seen: dict[bytes, int] = {}
        self._tail = b""
        self._deltas = 0

    def feed(self, chunk: bytes) -> None:
        """Scan one chunk (plus the end of the previous one, for counters cut in two)."""
        self._deltas += chunk.count(b'"delta"')
        data = self._tail + chunk
        if b"_tokens" in data:
            for name, value in _USAGE.findall(data):
                self._seen[name] = int(value)
        self._tail = chunk[-_TAIL:]

    @property
    def tokens(self) -> int:
        """Tokens used: reported totals when present, else the estimate."""
        seen = self._seen
        if b"total_tokens" in seen:
            return seen[b"total_tokens"]
        if b"prompt_tokens" in seen or b"completion_tokens" in seen:
            return seen.get(b"prompt_tokens", 0) + seen.get(b"completion_tokens", 0)
        if b"input_tokens" in seen or b"output_tokens" in seen:
            return seen.get(b"input_tokens", 0) + seen.get(b"output_tokens", 0)
        return self._request_bytes // 4 + self._deltas
