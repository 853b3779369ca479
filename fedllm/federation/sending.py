"""The global model sent to many sites at once, with a bounded cache on the server.

NVFlare's server serializes each tensor of the task once and caches the bytes until every
site has downloaded it (``CacheableObject``). Sites never download in step: the cache holds
everything between the slowest site and the fastest, up to a whole serialized copy of the
model, and more sites spread further apart (B3 measured the server job at 4.2× a 425 MB
model with 16 sites, against 2.2× with 2). Here a tensor's bytes are cached only while the
cache holds at most ``SEND_CACHE_BYTES``; past that, a site that asks for a tensor gets it
serialized for itself (one memory copy of that tensor, freed once sent). What every site
receives is unchanged.

The torch tensor decomposer registered in the sending process makes these downloadables
instead of NVFlare's (:func:`bound_the_send_cache`, called by fedllm's persistor). It subclasses NVFlare 2.9's
``TensorDownloadable`` and reimplements its cache's two private methods;
:func:`check_nvflare_send_cache` fails loudly, naming the version, if they moved.
"""

from __future__ import annotations

from typing import Optional

#: bytes of serialized tensors the server keeps for the sites still to download them
SEND_CACHE_BYTES = 64 << 20


def check_nvflare_send_cache() -> None:
    """The NVFlare internals this module relies on, or a RuntimeError naming the version."""
    import nvflare
    from nvflare.fuel.f3.streaming.cacheable import CacheableObject
    from nvflare.fuel.utils.fobs import fobs as fobs_module

    missing = [name for name in ("_get_item", "_adjust_cache", "clear_cache", "produce_item")
               if not callable(getattr(CacheableObject, name, None))]
    if not isinstance(getattr(fobs_module, "_decomposers", None), dict):
        missing.append("fobs._decomposers")
    if missing:
        raise RuntimeError(f"nvflare {nvflare.__version__}: {', '.join(missing)} moved; "
                           "fedllm.federation.sending was written for NVFlare 2.9's CacheableObject")


def bound_the_send_cache(cache_bytes: int = SEND_CACHE_BYTES) -> None:
    """Make this process serialize torch tensors for download with a cache of at most
    ``cache_bytes`` (see the module). Idempotent."""
    import types

    import torch
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs
    from nvflare.fuel.utils.fobs import fobs as fobs_module
    from nvflare.fuel.utils.fobs.fobs import get_class_name

    check_nvflare_send_cache()
    fobs.register(TensorDecomposer)  # a no-op where one is registered already
    # The registered instance also downloads (its Datum handlers keep what it received), so
    # only the way it makes a downloadable changes, on that very instance.
    decomposer = fobs_module._decomposers[get_class_name(torch.Tensor)]
    downloadable = _downloadable_class()

    def to_downloadable(self, items: dict, max_chunk_size: int, fobs_ctx: dict):
        return downloadable(items, max_chunk_size, cache_bytes)

    decomposer.to_downloadable = types.MethodType(to_downloadable, decomposer)


def _downloadable_class():
    from nvflare.app_opt.pt.tensor_downloader import TensorDownloadable

    class BoundedCacheTensorDownloadable(TensorDownloadable):
        """NVFlare's TensorDownloadable whose cache of serialized tensors holds at most ``cache_bytes``."""

        def __init__(self, tensors: dict, max_chunk_size: int, cache_bytes: int):
            super().__init__(tensors, max_chunk_size)
            self.cache_bytes = cache_bytes
            self.cached_bytes = 0

        def _get_item(self, index: int, requester: str) -> bytes:
            with self.lock:
                data: Optional[bytes] = self.cache[index][0] if self.cache else None
                if self.base_obj is None and data is None:
                    raise RuntimeError(f"item {index} requested after the tensors were released, for {requester}")
            if data is not None:
                return data
            data = self.produce_item(index)
            with self.lock:
                if self.cache:
                    existing, count = self.cache[index]
                    if existing is not None:
                        return existing  # produced by another site's request meanwhile
                    # worth keeping only for sites still to come, and only within the budget
                    if count + 1 < self.num_receivers and self.cached_bytes + len(data) <= self.cache_bytes:
                        self.cache[index] = (data, count)
                        self.cached_bytes += len(data)
            return data

        def _adjust_cache(self, start: int, count: int) -> None:
            with self.lock:
                if not self.cache:
                    return
                for i in range(start, start + count):
                    data, received = self.cache[i]
                    received += 1
                    if data is not None and received >= self.num_receivers:
                        self.cached_bytes -= len(data)
                        data = None
                    self.cache[i] = (data, received)

        def clear_cache(self) -> None:
            with self.lock:
                self.cache = None
                self.cached_bytes = 0

    return BoundedCacheTensorDownloadable
