"""Identity events (`key.revoked`, `user.disabled`, …) on the `<prefix>.events` topic exchange, sent after commit."""

from __future__ import annotations

import logging
from typing import Any

from pika.adapters.blocking_connection import BlockingChannel
from pika.exceptions import UnroutableError

from parley_kit.amqp import Publisher, PublishFailed

from .settings import AuthSettings

log = logging.getLogger(__name__)

KEY_REVOKED = "key.revoked"
USER_DISABLED = "user.disabled"
PASSWORD_CHANGED = "password.changed"  # noqa: S105 - an event name
ROLE_CHANGED = "user.role_changed"


class IdentityEvents:
    """Publishes identity events with confirms; a broker outage is logged, never failed to the client.

    Gateways also expire cached identities on their own (TTL), so a lost event only delays a revocation.
    """

    def __init__(self, settings: AuthSettings) -> None:
        self.exchange = settings.amqp_name("events")
        self._publisher = Publisher(settings.amqp_url, declare=self._declare)  # connects on first publish

    def _declare(self, channel: BlockingChannel) -> None:
        channel.exchange_declare(self.exchange, exchange_type="topic", durable=True)

    def publish(self, event_type: str, data: dict[str, Any]) -> bool:
        """Publish one event (routing key = type); False when the broker did not take it."""
        try:
            self._publisher.publish(self.exchange, event_type, event_type, data)
            return True
        except PublishFailed as exc:
            if isinstance(exc.__cause__, UnroutableError):
                # Nobody has bound a queue yet (no gateway running): nothing holds a cache to drop.
                log.info("identity event had no subscriber", extra={"event.action": event_type})
            else:
                log.warning(
                    "could not publish identity event; subscribers fall back to their cache TTL",
                    extra={"event.action": event_type, "error.type": type(exc.__cause__ or exc).__name__},
                )
            return False

    def close(self) -> None:
        """Close this thread's broker connection."""
        self._publisher.close()
