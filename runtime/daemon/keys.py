"""The daemon's Redis keys, beside the run and queue keys of `RedisKeys`.

- `treadle:{auth}:tenants`   hash: tenant id -> tenant JSON (limits, revoked);
- `treadle:{auth}:apikeys`   hash: key id -> key JSON (tenant, sha256 of the key, revoked).
  Both carry the hash tag `{auth}`, so the authentication script may read both in one
  round trip on Redis Cluster too;
- `treadle:tenant:<t>:workflows`  hash: workflow name -> its latest version's info;
- `treadle:tenant:<t>:wfversions:<name>`  hash: version number -> that version's info
  (each version written once, never changed);
- `treadle:wfdef:<sha256>`   hash: `format`, `text`: a definition by content (immutable, so a
  run keeps the program it was submitted with when its workflow is registered again);
- `treadle:tenant:<t>:active`  sorted set: the tenant's runs not yet settled (score: when
  submitted), for the concurrent-runs quota;
- `treadle:tenant:<t>:tokens:<minute>`  counter: LLM tokens used in that minute.

Tenant ids are restricted to `[a-z0-9][a-z0-9_-]*`, so they cannot inject key separators.
"""

from __future__ import annotations

from dataclasses import dataclass

from treadle.runtime.stores.redis import RedisKeys


@dataclass(frozen=True, slots=True)
class DaemonKeys:
    prefix: str = "treadle"

    @property
    def runs(self) -> RedisKeys:
        return RedisKeys(self.prefix)

    def tenants(self) -> str:
        return f"{self.prefix}:{{auth}}:tenants"

    def api_keys(self) -> str:
        return f"{self.prefix}:{{auth}}:apikeys"

    def workflows(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:workflows"

    def workflow_versions(self, tenant: str, name: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:wfversions:{name}"

    def definition(self, digest: str) -> str:
        return f"{self.prefix}:wfdef:{digest}"

    def active(self, tenant: str) -> str:
        return f"{self.prefix}:tenant:{tenant}:active"

    def tokens(self, tenant: str, minute: int) -> str:
        return f"{self.prefix}:tenant:{tenant}:tokens:{minute}"
