"""Routing and resilience: weighted deployments, fallbacks, one retry loop and a circuit breaker per deployment.

The SDKs never retry; this loop is the only one. A call tries the alias's deployments (weighted random first),
then its fallbacks' deployments of the same provider, skipping any whose breaker is open. A retry happens only
on 429/5xx/timeout/unreachable, before any byte has reached the client, and waits the backoff or the provider's
`Retry-After` (never longer than `retry_max_wait`: a longer wait goes straight to the next deployment).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import orjson
from prometheus_client import Gauge

from parley_kit.errors import ParleyError, ServiceUnavailable
from parley_kit.forward import ForwardResponse

from .catalog import Catalog, Deployment
from .upstream import Upstreams

log = logging.getLogger(__name__)

CIRCUIT_OPEN = Gauge(
    "parley_circuit_open",
    "1 while the circuit breaker of an upstream deployment is open (calls fail fast), else 0.",
    ["deployment"],
    multiprocess_mode="max",
)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard one client call may push upstream."""

    max_attempts: int = 2
    backoff_base: float = 0.1
    retry_max_wait: float = 2.0
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0


class CircuitBreaker:
    """Consecutive-failure breaker: closed → open (fail fast) → half-open (one probe) → closed or open again.

    Only the counters sit under the lock; the upstream call itself never does, so concurrent calls stay concurrent.
    """

    def __init__(self, name: str, *, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic):
        self.name = name
        self.threshold = failures
        self.cooldown = cooldown
        self.clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def is_open(self) -> bool:
        """Whether calls are being refused right now (open, or half-open with its probe out)."""
        with self._lock:
            return self._opened_at is not None and (self._probing or self.clock() - self._opened_at < self.cooldown)

    def retry_in(self) -> float:
        """Seconds until the breaker lets a probe through (0 when closed)."""
        with self._lock:
            if self._opened_at is None:
                return 0.0
            return max(0.0, self.cooldown - (self.clock() - self._opened_at))

    def allow(self) -> bool:
        """May a call go upstream now? After the cooldown exactly one caller gets the half-open probe."""
        with self._lock:
            if self._opened_at is None:
                return True
            if self._probing or self.clock() - self._opened_at < self.cooldown:
                return False
            self._probing = True
            return True

    def success(self) -> None:
        """The deployment answered (any non-retryable answer counts): close the breaker."""
        with self._lock:
            was_open = self._opened_at is not None
            self._failures, self._opened_at, self._probing = 0, None, False
        if was_open:
            log.info("circuit closed", extra={"parley.deployment": self.name})
            CIRCUIT_OPEN.labels(self.name).set(0)

    def failure(self) -> None:
        """The deployment failed (429/5xx/timeout): count it; open at the threshold or when a probe fails."""
        with self._lock:
            self._failures += 1
            opening = self._probing or (self._opened_at is None and self._failures >= self.threshold)
            if opening:
                self._opened_at, self._probing = self.clock(), False
        if opening:
            log.warning("circuit opened", extra={"parley.deployment": self.name, "parley.failures": self._failures})
            CIRCUIT_OPEN.labels(self.name).set(1)


def retryable(error: ParleyError) -> bool:
    """Worth another attempt (elsewhere or later): rate limits, provider failures, timeouts, unreachable."""
    status = getattr(error, "upstream_status", None)
    return status is not None and (status == 0 or status == 429 or status >= 500)


class Router:
    """Chooses deployments for a call and runs the retry loop around one attempt function."""

    def __init__(
        self, catalog: Catalog, policy: RetryPolicy, upstreams: Upstreams, *, rng: random.Random | None = None
    ) -> None:
        self.catalog = catalog
        self.upstreams = upstreams
        self.total_timeout = upstreams.total_timeout
        self.policy = policy
        self._rng = rng or random.Random()  # noqa: S311 - load spreading, not security
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def breaker(self, deployment: Deployment) -> CircuitBreaker:
        """The (per-process) breaker of an upstream deployment."""
        breaker = self._breakers.get(deployment.key)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.setdefault(
                    deployment.key,
                    CircuitBreaker(
                        deployment.key, failures=self.policy.breaker_failures, cooldown=self.policy.breaker_cooldown
                    ),
                )
        return breaker

    def candidates(self, deployment: Deployment) -> list[Deployment]:
        """The order to try: this name's deployments by weighted draw, then its fallbacks' (same provider only)."""
        order = self._weighted(deployment.targets())
        for name in deployment.fallbacks:
            fallback = self.catalog.get(name)
            if fallback is not None:
                order.extend(self._weighted(fallback.targets()))
        # A fallback in the other API format would need translation on the way back: not tried here.
        return [d for d in order if d.provider is deployment.provider]

    def _weighted(self, targets: tuple[Deployment, ...]) -> list[Deployment]:
        """A weighted shuffle: each next pick is drawn by weight among those left."""
        left, order = list(targets), []
        while left:
            pick = self._rng.choices(range(len(left)), weights=[d.weight for d in left])[0]
            order.append(left.pop(pick))
        return order

    def call(self, deployment: Deployment, attempt: Callable[[Deployment], T]) -> tuple[Deployment, T]:
        """Run `attempt` on the candidates until one answers; the deployment that answered and its result.

        Raises the last upstream error, or 503 when every candidate's breaker is open (nothing sent upstream).
        """
        candidates = self.candidates(deployment)
        attempts = 0
        last: ParleyError | None = None
        for index, target in enumerate(candidates):
            breaker = self.breaker(target)
            while attempts < self.policy.max_attempts and breaker.allow():
                attempts += 1
                try:
                    result = attempt(target)
                except ParleyError as exc:
                    if not retryable(exc):
                        breaker.success()  # the provider is up; the request itself is at fault
                        raise
                    breaker.failure()
                    last = exc
                    wait = self._backoff(attempts, getattr(exc, "retry_after", None))
                    if wait is None or index + 1 < len(candidates):
                        break  # another deployment is ready now (or this one wants longer than we wait)
                    if attempts < self.policy.max_attempts:
                        time.sleep(wait)
                    continue
                except Exception:
                    breaker.failure()  # never leave a half-open probe hanging
                    raise
                breaker.success()
                return target, result
        if last is not None:
            raise last
        retry_in = min((self.breaker(d).retry_in() for d in candidates), default=self.policy.breaker_cooldown)
        raise ServiceUnavailable(
            f"the {deployment.provider.value} provider is failing; requests to {deployment.name!r} are paused",
            code="upstream_unavailable",
            headers={"retry-after": str(max(1, round(retry_in)))},
        )

    def complete(
        self, deployment: Deployment, path: str, content: bytes, *, headers: dict[str, str] | None = None
    ) -> tuple[Deployment, bytes]:
        """POST the request to the first deployment that answers; its whole answer."""

        def attempt(target: Deployment) -> bytes:
            body = with_model(content, target, deployment)
            return self.upstreams.complete(target.provider, path, body, headers=headers)

        return self.call(deployment, attempt)

    def open_stream(
        self, deployment: Deployment, path: str, content: bytes, *, headers: dict[str, str] | None = None
    ) -> tuple[Deployment, ForwardResponse]:
        """POST the request to the first deployment that answers; its stream, once its status is 2xx."""

        def attempt(target: Deployment) -> ForwardResponse:
            body = with_model(content, target, deployment)
            return self.upstreams.open(target.provider, path, body, stream=True, headers=headers)

        return self.call(deployment, attempt)

    def _backoff(self, attempt: int, retry_after: float | None) -> float | None:
        """How long to wait before the next attempt, or None when the provider asks for more than we wait."""
        if retry_after is not None:
            return retry_after if retry_after <= self.policy.retry_max_wait else None
        wait = self.policy.backoff_base * (2 ** (attempt - 1))
        return min(self.policy.retry_max_wait, wait * (0.5 + self._rng.random()))


def with_model(content: bytes, deployment: Deployment, primary: Deployment) -> bytes:
    """The request bytes for `deployment`: unchanged for the primary's upstream model, renamed otherwise."""
    if deployment.upstream_model == primary.upstream_model:
        return content
    return orjson.dumps({**orjson.loads(content), "model": deployment.upstream_model})
