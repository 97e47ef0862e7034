"""Per-API-key allow-lists for vLLM's OpenAI server with the plugin (``dlplora serve --tenants FILE``).

The tenants file (JSON; docs/vllm.md, "Tenants")::

    {"tenants": [
      {"name": "acme",  "key_sha256": "<64 hex digits>", "adapters": ["de", "fr"]},
      {"name": "globex", "key": "<the key itself>",      "adapters": ["code"]},
      {"name": "ops",   "key_sha256": "...",             "adapters": "*", "admin": true}
    ]}

Each tenant has one API key (``key``, at least 16 characters, or its SHA-256 as ``key_sha256``: then the
file holds no key) and the adapters its requests may reach, by name (``"*"``: every adapter). The server
keeps the keys' SHA-256 only and compares a request's key with every tenant's in constant time
(``hmac.compare_digest`` on the digests, no early exit). Keys are never logged or echoed: errors name
tenants, never keys.

:class:`Tenants` authenticates a request (:meth:`Tenants.tenant_of`); what a tenant may do is
:class:`Tenant`'s: its adapters (``allows``), and whether it is an admin (every endpoint, the runtime
adapter endpoints and ``/metrics`` included). :class:`~dlplora_triton.integrations.vllm.server.MixMiddleware`
applies both after vLLM's own middlewares, before a body is read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import stat
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

from dlplora_triton.integrations.vllm.mixes import ADAPTER_NAME

__all__ = ["admit", "OPEN_PATHS", "TENANT_PATHS", "TENANTS_ENV", "Tenant", "Tenants", "read_tenants"]

TENANTS_ENV = "DLPLORA_TENANTS_FILE"
# Probes anyone may call (they say nothing about adapters): as in vLLM, without a key.
OPEN_PATHS = ("/health", "/ping", "/version")
# What a tenant that is not an admin may call; every other path is an admin's (403 otherwise).
TENANT_PATHS = ("/v1/completions", "/v1/chat/completions", "/v1/models")
MIN_KEY_CHARS = 16
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True)
class Tenant:
    """One API key's allowances: ``adapters`` (a frozenset of names; None: every adapter) and ``admin``."""

    name: str
    adapters: frozenset | None
    admin: bool = False

    def allows(self, adapter: str) -> bool:
        """Whether this tenant's requests may reach ``adapter``."""
        return self.adapters is None or adapter in self.adapters


class Tenants:
    """The tenants of a tenants file, keyed by their keys' SHA-256 digests (see the module docstring)."""

    def __init__(self, entries: list[tuple[bytes, Tenant]]):
        self._entries = entries

    @classmethod
    def from_env(cls) -> Tenants | None:
        """The tenants of ``$DLPLORA_TENANTS_FILE``, or None when it is not set (no allow-lists)."""
        path = os.environ.get(TENANTS_ENV)
        return cls(read_tenants(path)) if path else None

    @property
    def names(self) -> list[str]:
        return [tenant.name for _, tenant in self._entries]

    def tenant_of(self, headers) -> Tenant | None:
        """The tenant whose key the request's ``Authorization: Bearer <key>`` header carries, or None.
        ``headers``: the ASGI scope's ``[(name, value), ...]`` byte pairs."""
        value = None
        for name, raw in headers or ():
            if name.lower() == b"authorization":
                value = raw
        if value is None:
            return None
        scheme, _, key = value.partition(b" ")
        if scheme.lower() != b"bearer":
            return None
        digest = hashlib.sha256(key.strip()).digest()
        found = None
        for expected, tenant in self._entries:  # every entry compared: the time says nothing of which
            if hmac.compare_digest(digest, expected):
                found = tenant
        return found


async def admit(tenants: Tenants, scope, path: str, send) -> bool:
    """Whether the request may go on (its tenant recorded in the scope), else the 401
    (no tenant's key) or 403 (a path this tenant may not call) is sent. Reads only the headers."""
    from dlplora_triton.integrations.vllm.asgi import TENANT_SCOPE_KEY, RequestError, send_error

    if scope["type"] not in ("http", "websocket") or scope.get("method") == "OPTIONS":
        return True
    tenant = tenants.tenant_of(scope.get("headers"))
    if tenant is None and path in OPEN_PATHS:
        return True
    if tenant is not None and (tenant.admin or path in TENANT_PATHS):
        scope[TENANT_SCOPE_KEY] = tenant
        return True
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return False
    if tenant is None:  # vLLM's own 401 body
        body = b'{"error": "Unauthorized"}'
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return False
    await send_error(
        send,
        RequestError(
            HTTPStatus.FORBIDDEN,
            f"this API key may call {', '.join(TENANT_PATHS)} only (the others are the operator's)",
            None,
        ),
    )
    return False


def read_tenants(path: str | os.PathLike) -> list[tuple[bytes, Tenant]]:
    """``[(SHA-256 of the key, Tenant), ...]`` of a tenants file; ValueError naming the entry and field
    (never a key) for anything malformed, FileNotFoundError for a missing file."""
    path = Path(path)
    where = f"tenants file {str(path)!r}"
    if not path.is_file():
        raise FileNotFoundError(f"{where} does not exist")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{where} is not readable JSON: {type(e).__name__}") from None
    tenants = config.get("tenants") if isinstance(config, dict) else None
    if not isinstance(tenants, list) or not tenants:
        raise ValueError(
            f'{where} must be an object {{"tenants": [{{"name", "key" or "key_sha256", "adapters"}}, ...]}}'
        )
    entries, names, plain = [], set(), False
    for i, entry in enumerate(tenants):
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: tenants[{i}] must be an object")
        name = entry.get("name")
        if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
            raise ValueError(f"{where}: tenants[{i}].name must be a name (letters, digits, '_', '.', '-')")
        what = f"{where}: tenant {name!r}"
        if name in names:
            raise ValueError(f"{what} is listed twice")
        names.add(name)
        unknown = sorted(set(entry) - {"name", "key", "key_sha256", "adapters", "admin"})
        if unknown:
            raise ValueError(
                f"{what} has unknown fields {unknown} (name, key or key_sha256, adapters, admin)"
            )
        key, digest = entry.get("key"), entry.get("key_sha256")
        if (key is None) == (digest is None):
            raise ValueError(f"{what} needs one of 'key' and 'key_sha256'")
        if key is not None:
            if (
                not isinstance(key, str)
                or len(key) < MIN_KEY_CHARS
                or not key.isascii()
                or not key.isprintable()
            ):
                raise ValueError(f"{what}: 'key' must be at least {MIN_KEY_CHARS} printable ASCII characters")
            if key != key.strip():
                raise ValueError(f"{what}: 'key' must not start or end with blanks")
            raw, plain = hashlib.sha256(key.encode()).digest(), True
        else:
            if not isinstance(digest, str) or len(digest) != 64 or not set(digest.lower()) <= _HEX:
                raise ValueError(f"{what}: 'key_sha256' must be 64 hex digits (sha256sum of the key)")
            raw = bytes.fromhex(digest)
        if any(hmac.compare_digest(raw, other) for other, _ in entries):
            raise ValueError(f"{what} has the same key as another tenant")
        adapters = entry.get("adapters")
        if adapters == "*":
            allowed = None
        elif isinstance(adapters, list) and all(
            isinstance(a, str) and ADAPTER_NAME.fullmatch(a) for a in adapters
        ):
            allowed = frozenset(adapters)
        else:
            raise ValueError(f"{what}: 'adapters' must be a list of adapter names or \"*\" (every adapter)")
        admin = entry.get("admin", False)
        if not isinstance(admin, bool):
            raise ValueError(f"{what}: 'admin' must be true or false")
        entries.append((raw, Tenant(name, allowed, admin)))
    if plain and os.name == "posix" and path.stat().st_mode & (stat.S_IROTH | stat.S_IWOTH):
        raise ValueError(
            f"{where} holds keys and every user of this machine may read it: chmod o-rw it, or give "
            "'key_sha256' instead of 'key'"
        )
    return entries
