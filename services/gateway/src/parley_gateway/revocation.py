"""Auth's identity events drop cached identities at once: one private queue per gateway process."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime

from pika.adapters.blocking_connection import BlockingChannel

from parley_kit.amqp import Consumer, Message

from .credentials import KeyCache, UserRevocations

log = logging.getLogger(__name__)

EVENT_TYPES = ("key.revoked", "user.disabled", "password.changed", "user.role_changed")


def apply_event(message: Message, *, keys: KeyCache, users: UserRevocations) -> None:
    """Drop what an identity event makes stale (events this gateway does not know are ignored)."""
    data = message.data
    user_id = data.get("user_id")
    if message.type == "key.revoked":
        key_id = data.get("key_id")
        dropped = keys.drop_key(str(key_id)) if key_id is not None else 0
    elif message.type in ("user.disabled", "password.changed", "user.role_changed"):
        if user_id is None:
            return
        dropped = keys.drop_user(str(user_id))  # a key's cached token carries the user's role too
        at, role = _epoch(message.occurred_at), data.get("role")
        if message.type == "user.role_changed" and isinstance(role, str):
            users.set_role(str(user_id), role, at)  # tokens with any other role are refused, whenever issued
        else:
            # A disabled user can get no new token, so even one issued in the second of the event is refused (as for
            # a role change without its role); after a password change the user logs in again at once, so only
            # tokens from earlier seconds are.
            users.revoke(str(user_id), at, whole_second=message.type != "password.changed")
    else:
        return
    log.info("identity event applied", extra={"event.action": message.type, "parley.dropped": dropped})


def declare_events_queue(exchange: str) -> Callable[[BlockingChannel], str]:
    """Declare auth's topic exchange (start order must not matter) and a server-named, exclusive queue bound to it."""

    def declare(channel: BlockingChannel) -> str:
        channel.exchange_declare(exchange, exchange_type="topic", durable=True)
        queue = channel.queue_declare("", exclusive=True, auto_delete=True).method.queue
        for event_type in EVENT_TYPES:
            channel.queue_bind(queue, exchange, routing_key=event_type)
        return queue

    return declare


def start_listener(amqp_url: str, exchange: str, *, keys: KeyCache, users: UserRevocations) -> Consumer:
    """Consume identity events in the background (a greenlet under gevent); a missing broker only logs warnings."""
    consumer = Consumer(
        amqp_url,
        lambda message: apply_event(message, keys=keys, users=users),
        declare=declare_events_queue(exchange),
        prefetch=16,
        name="gateway-revocations",
    )
    consumer.start_in_thread()
    return consumer


def _epoch(occurred_at: str) -> float | None:
    """The event's time as epoch seconds (it may arrive late), or None when unreadable."""
    try:
        return datetime.fromisoformat(occurred_at).timestamp()
    except (TypeError, ValueError):
        return None
