"""The worker's store of teacher-output caches (:mod:`kd_engine.teacher_cache`): the artifact
store, under ``cache/teacher/<tenant id>/<cache key>/teacher_logits.safetensors``.

The tenant id is part of the prefix, so a tenant's cache never serves another tenant's job
(even one with the same teacher and data): a cache is derived from the tenant's teacher and
data, and its existence would say that another tenant trained on them. A storage error is
logged and treated as a miss (on fetch) or left unstored (on store); it never fails the job.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from core.settings import Settings
from core.storage import StorageError, artifact_storage, join_key
from kd_engine.names import CACHE_FILE

log = logging.getLogger("distillery.worker")

CACHE_PREFIX = "cache/teacher"
"""Where teacher caches live in the artifact store (then ``<tenant id>/<key>/``)."""


def cache_prefix(tenant_id: str, key: str) -> str:
    """``cache/teacher/<tenant id>/<key>``: the prefix of one tenant's cache.

    Raises:
        core.storage.InvalidKey: the tenant id or key is not a valid key segment.
    """
    return join_key(CACHE_PREFIX, tenant_id, key)


class ArtifactCacheStore:
    """A :class:`kd_engine.teacher_cache.CacheStore` of one tenant in the artifact store."""

    def __init__(self, settings: Settings, tenant_id: str) -> None:
        self.storage = artifact_storage(settings)
        self.tenant_id = tenant_id

    def _key(self, key: str) -> str:
        return join_key(cache_prefix(self.tenant_id, key), CACHE_FILE)

    def fetch(self, key: str, directory: Path) -> bool:
        """Copy the tenant's cache ``key`` into ``directory``; False when there is none (or
        the store could not be read: logged)."""
        try:
            if not self.storage.exists(self._key(key)):
                return False
            directory.mkdir(parents=True, exist_ok=True)
            with (
                self.storage.open(self._key(key)) as src,
                (directory / CACHE_FILE).open("wb") as dst,
            ):
                shutil.copyfileobj(src, dst)
            return True
        except (StorageError, OSError):
            log.exception("teacher cache %s: not fetched (treated as a miss)", key[:12])
            return False

    def store(self, key: str, directory: Path) -> None:
        """Keep ``directory``'s cache file as the tenant's cache ``key`` (an error is logged)."""
        try:
            with (directory / CACHE_FILE).open("rb") as f:
                self.storage.put(self._key(key), f)
        except (StorageError, OSError):
            log.exception("teacher cache %s: not stored", key[:12])
