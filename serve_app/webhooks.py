"""Webhook URLs as the API takes them (docs/webhooks.md).

A URL's form is checked by the request schema (`scheduling.webhooks.check_url`); here, where it
leads: unless SEIDRA_WEBHOOK_ALLOW_PRIVATE is on, its host must resolve to public addresses only.
The router checks again at every attempt, since a DNS answer may change.
"""

from __future__ import annotations

import asyncio
import socket
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from fastapi.exceptions import RequestValidationError

from scheduling.webhooks import check_addresses
from storage.api_keys import Principal

# Lookups in threads of their own, bounded in time: a host whose DNS never answers must not hold
# the threads that serve the API's database reads.
_RESOLVER = ThreadPoolExecutor(4, thread_name_prefix="seidra-webhook-dns")
LOOKUP_TIMEOUT_S = 5.0


async def check_webhook(url: str | None, principal: Principal, allow_private: bool, field: str = "webhook_url") -> None:
    """422 naming `field` (a body field) when `url` may not be a webhook of `principal`'s."""
    if url is None:
        return
    if principal.key_id is None:
        raise invalid(field, "needs API keys (SEIDRA_AUTH=keys): deliveries are signed with the key's webhook secret")
    if allow_private:
        return
    parts = urlsplit(url)
    host = parts.hostname or ""
    try:
        lookup = asyncio.get_running_loop().run_in_executor(
            _RESOLVER, socket.getaddrinfo, host, parts.port or 443, 0, socket.SOCK_STREAM
        )
        found = await asyncio.wait_for(lookup, LOOKUP_TIMEOUT_S)
        check_addresses(host, [str(info[4][0]) for info in found], allow_private=False)
    except (OSError, TimeoutError):
        raise invalid(field, f"host {host} does not resolve") from None
    except ValueError as refused:
        raise invalid(field, str(refused)) from None


def invalid(field: str, reason: str) -> RequestValidationError:
    """A 422 as the request schemas answer theirs: FastAPI's `detail`, and a `message` naming the field."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("body", field), "msg": f"Value error, {reason}", "input": None}]
    )
