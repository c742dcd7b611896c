"""Tenants and their API keys, stored in Redis.

An API key is `trd_<key id>_<secret>`: a public key id (12 hex digits, to find the key's
record) and a secret of 256 random bits. Redis keeps only the SHA-256 of the whole key.
Checking a presented key costs one round trip (a script reads the key's record and its
tenant's together) and one hash, compared with `hmac.compare_digest` in constant time.

Why a plain SHA-256 and no slow password hash (bcrypt, scrypt, argon2): a slow hash makes
guessing a *low-entropy* secret (a password) from a stolen digest expensive. These keys are
generated, not chosen: 256 random bits cannot be guessed at any hash speed, so a slow hash
would add nothing but latency to every request (tens of milliseconds each, and a lever for
denial of service). A stolen digest cannot be replayed either: the server hashes what the
client presents, so the digest itself does not authenticate.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError
from redis.asyncio import Redis

from treadle.errors import DaemonError
from treadle.runtime.daemon.keys import DaemonKeys

TENANT_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
TOKEN = re.compile(r"^trd_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")

# KEYS: apikeys, tenants.  ARGV: key id.  -> {key JSON, tenant JSON or false}
_AUTH_LUA = """
local key = redis.call('HGET', KEYS[1], ARGV[1])
if not key then return false end
local tenant = redis.call('HGET', KEYS[2], cjson.decode(key)['tenant'])
return {key, tenant}
"""


class Tenant(BaseModel):
    id: str
    created_at: float
    max_concurrent_runs: int
    tokens_per_minute: int | None = None
    revoked: bool = False


class ApiKey(BaseModel):
    key_id: str
    tenant: str
    #: SHA-256 (hex) of the whole key
    digest: str
    created_at: float
    revoked: bool = False


class TenantError(DaemonError, ValueError):
    """A tenant operation that cannot be done (bad id, exists already, unknown)."""


@dataclass(frozen=True)
class IssuedKey:
    """A new API key: `token` is shown once and never stored."""

    token: str
    key: ApiKey


def key_digest(token: str) -> str:
    """What is stored of an API key: its SHA-256, hex."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def key_id_of(token: str) -> str | None:
    """The public key id of a well-formed API key (no secret is checked), or None."""
    match = TOKEN.fullmatch(token)
    return match[1] if match is not None else None


def check_tenant_id(tenant_id: str) -> str:
    if not TENANT_ID.fullmatch(tenant_id):
        raise TenantError(
            f"tenant id {tenant_id!r}: use 1-63 lowercase letters, digits, '_' or '-', "
            "starting with a letter or digit"
        )
    return tenant_id


class TenantStore:
    def __init__(self, redis: Redis, keys: DaemonKeys) -> None:
        self.redis = redis
        self.keys = keys
        self._auth = redis.register_script(_AUTH_LUA)

    async def create(
        self,
        tenant_id: str,
        *,
        max_concurrent_runs: int,
        tokens_per_minute: int | None = None,
    ) -> Tenant:
        check_tenant_id(tenant_id)
        if max_concurrent_runs < 1:
            raise TenantError("max_concurrent_runs must be >= 1")
        if tokens_per_minute is not None and tokens_per_minute < 1:
            raise TenantError("tokens_per_minute must be >= 1 (or unlimited)")
        tenant = Tenant(
            id=tenant_id,
            created_at=time.time(),
            max_concurrent_runs=max_concurrent_runs,
            tokens_per_minute=tokens_per_minute,
        )
        if not await self.redis.hsetnx(self.keys.tenants(), tenant_id, tenant.model_dump_json()):
            raise TenantError(f"tenant {tenant_id!r} exists already")
        return tenant

    async def get(self, tenant_id: str) -> Tenant | None:
        raw = await self.redis.hget(self.keys.tenants(), tenant_id)
        return Tenant.model_validate_json(raw) if raw is not None else None

    async def issue_key(self, tenant_id: str) -> IssuedKey:
        tenant = await self.get(tenant_id)
        if tenant is None:
            raise TenantError(f"no tenant {tenant_id!r}")
        if tenant.revoked:
            raise TenantError(f"tenant {tenant_id!r} is revoked")
        while True:
            key_id = secrets.token_hex(6)
            token = f"trd_{key_id}_{secrets.token_urlsafe(32)}"
            key = ApiKey(
                key_id=key_id, tenant=tenant_id, digest=key_digest(token), created_at=time.time()
            )
            if await self.redis.hsetnx(self.keys.api_keys(), key_id, key.model_dump_json()):
                return IssuedKey(token, key)

    async def list_tenants(self) -> list[tuple[Tenant, list[ApiKey]]]:
        tenants_raw = await self.redis.hgetall(self.keys.tenants())
        keys_raw = await self.redis.hgetall(self.keys.api_keys())
        by_tenant: dict[str, list[ApiKey]] = {}
        for raw in keys_raw.values():
            key = ApiKey.model_validate_json(raw)
            by_tenant.setdefault(key.tenant, []).append(key)
        tenants = sorted(
            (Tenant.model_validate_json(raw) for raw in tenants_raw.values()), key=lambda t: t.id
        )
        return [(t, sorted(by_tenant.get(t.id, []), key=lambda k: k.created_at)) for t in tenants]

    async def revoke_tenant(self, tenant_id: str) -> int:
        """Revoke the tenant and every key of it; returns the number of keys revoked."""
        tenant = await self.get(tenant_id)
        if tenant is None:
            raise TenantError(f"no tenant {tenant_id!r}")
        # the tenant first: from here on no key of it authenticates
        revoked = tenant.model_copy(update={"revoked": True})
        await self.redis.hset(self.keys.tenants(), tenant_id, revoked.model_dump_json())
        count = 0
        for raw in (await self.redis.hgetall(self.keys.api_keys())).values():
            key = ApiKey.model_validate_json(raw)
            if key.tenant == tenant_id and not key.revoked:
                await self._put_key(key.model_copy(update={"revoked": True}))
                count += 1
        return count

    async def revoke_key(self, key_id: str) -> ApiKey:
        raw = await self.redis.hget(self.keys.api_keys(), key_id)
        if raw is None:
            raise TenantError(f"no API key {key_id!r}")
        key = ApiKey.model_validate_json(raw).model_copy(update={"revoked": True})
        await self._put_key(key)
        return key

    async def authenticate(self, token: str) -> Tenant | None:
        """The tenant `token` belongs to, or None (unknown, wrong or revoked key, or a
        revoked tenant). The caller cannot tell which, by design."""
        match = TOKEN.fullmatch(token)
        if match is None:
            return None
        found = await self._auth(keys=[self.keys.api_keys(), self.keys.tenants()], args=[match[1]])
        if not found:
            return None
        try:
            key = ApiKey.model_validate_json(found[0])
            tenant = Tenant.model_validate_json(found[1]) if found[1] else None
        except ValidationError:
            return None
        presented = key_digest(token)
        if not hmac.compare_digest(presented.encode(), key.digest.encode()):
            return None
        if key.revoked or tenant is None or tenant.revoked or tenant.id != key.tenant:
            return None
        return tenant

    async def _put_key(self, key: ApiKey) -> None:
        await self.redis.hset(self.keys.api_keys(), key.key_id, key.model_dump_json())
