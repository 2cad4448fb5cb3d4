"""Login throttling per account and per client address, in fixed windows kept in the database.

The counters live in the auth database (one atomic upsert per failure, on SQLite and PostgreSQL alike), so every
auth process and worker sees the same counts, and `make run` needs no Redis for it.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import case, delete, literal, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from parley_kit.db import UTCDateTime, utcnow
from parley_kit.errors import RateLimited

from .models import LoginFailures
from .settings import AuthSettings

log = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# More hops than any real proxy chain: a longer header is someone padding it.
MAX_FORWARDED_HOPS = 20
# One answer for every throttled login, whether or not the account exists.
THROTTLED = "too many failed logins; try again later"
PURGE_ONE_IN = 200


def _parse_address(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(value.strip())
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _trusted(address: ipaddress.IPv4Address | ipaddress.IPv6Address, proxies: Iterable[IpNetwork]) -> bool:
    return any(address.version == network.version and address in network for network in proxies)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Iterable[IpNetwork]) -> str:
    """The address a request came from: the direct peer, or, behind trusted proxies, whom they forwarded for.

    X-Forwarded-For is read from the right: each trusted proxy appends the address it received from, and whatever
    a client wrote there itself sits further left. So we walk left only while the hop we stand on is a trusted
    proxy; the first address that is not one is the client. (Taking the leftmost entry would let any client pick
    its own address, and with it a fresh per-address budget for every request.)
    """
    proxies = tuple(trusted_proxies)
    current = _parse_address(peer or "")
    if current is None:
        return (peer or "unknown")[:45]
    if forwarded_for and _trusted(current, proxies):
        hops = [hop for hop in forwarded_for.split(",") if hop.strip()][-MAX_FORWARDED_HOPS:]
        for hop in reversed(hops):
            if not _trusted(current, proxies):
                break
            parsed = _parse_address(hop)
            if parsed is None:  # a trusted proxy would not write garbage: stop at what we can vouch for
                break
            current = parsed
    return str(current)


@dataclass(frozen=True, slots=True)
class LoginAttempt:
    """Whom a login tries to enter and where it comes from: the two counters it is judged by."""

    email: str
    address: str

    @property
    def account_subject(self) -> str:
        """The account's counter (the email hashed, so any input fits and none is kept verbatim)."""
        return "account:" + hashlib.sha256(self.email.strip().lower().encode()).hexdigest()

    @property
    def address_subject(self) -> str:
        """The client address's counter."""
        return "address:" + self.address


def _limits(settings: AuthSettings, attempt: LoginAttempt) -> dict[str, int]:
    return {
        attempt.account_subject: settings.login_max_failures_per_account,
        attempt.address_subject: settings.login_max_failures_per_address,
    }


def check(session: Session, *, settings: AuthSettings, attempt: LoginAttempt, now: datetime | None = None) -> None:
    """429 with Retry-After while the account or the address has used up its failures in the current window.

    Checked before the password, so a correct password is refused too until the window passes: otherwise the
    11th guess would still tell an attacker whether it was right.
    """
    now = now or utcnow()
    window = timedelta(seconds=settings.login_window)
    limits = _limits(settings, attempt)
    rows = session.scalars(select(LoginFailures).where(LoginFailures.subject.in_(limits)))
    retry_after = 0
    for row in rows:
        ends = row.window_started_at + window
        if ends > now and row.failures >= limits[row.subject]:
            retry_after = max(retry_after, math.ceil((ends - now).total_seconds()))
    if retry_after:
        log.warning(
            "login throttled",
            extra={"client.ip": attempt.address, "event.action": "login-throttled", "event.outcome": "failure"},
        )
        raise RateLimited(THROTTLED, code="login_throttled", headers={"Retry-After": str(max(retry_after, 1))})


def record_failure(
    session: Session, *, settings: AuthSettings, attempt: LoginAttempt, now: datetime | None = None
) -> None:
    """Count one failed login against the account and the address (a window that has passed starts over)."""
    now = now or utcnow()
    table = LoginFailures.__table__
    insert = postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert
    expired = table.c.window_started_at <= now - timedelta(seconds=settings.login_window)
    for subject in (attempt.account_subject, attempt.address_subject):
        statement = insert(table).values(subject=subject, window_started_at=now, failures=1)
        # One statement per counter: concurrent failures in other processes add up instead of overwriting.
        statement = statement.on_conflict_do_update(
            index_elements=[table.c.subject],
            set_={
                "failures": case((expired, 1), else_=table.c.failures + 1),
                "window_started_at": case((expired, literal(now, UTCDateTime())), else_=table.c.window_started_at),
            },
        )
        session.execute(statement)
    if secrets.randbelow(PURGE_ONE_IN) == 0:  # now and then, so a spray of made-up emails cannot grow the table
        purge_expired(session, settings=settings, now=now)


def forget_account(session: Session, *, attempt: LoginAttempt) -> None:
    """A successful login clears the account's count (never the address's: one good account must not reset it)."""
    session.execute(delete(LoginFailures).where(LoginFailures.subject == attempt.account_subject))


def purge_expired(session: Session, *, settings: AuthSettings, now: datetime | None = None) -> int:
    """Delete counters whose window has passed; returns how many."""
    cutoff = (now or utcnow()) - timedelta(seconds=settings.login_window)
    result = session.execute(delete(LoginFailures).where(LoginFailures.window_started_at <= cutoff))
    return result.rowcount or 0
