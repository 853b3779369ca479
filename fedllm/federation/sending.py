"""The global model sent to many sites at once, and their updates received, in bounded
server memory.

Four things NVFlare 2.9's server does while sites download the global model and upload their
updates grow with the number of sites; each is bounded here:

* **The cache.** NVFlare serializes each tensor of the task once and caches the bytes until
  every site has downloaded it (``CacheableObject``). Sites never download in step: the
  cache holds everything between the slowest site and the fastest, up to a whole serialized
  copy of the model (B3: the server job at 4.2x a 425 MB model with 16 sites, 2.2x with 2).
  Here a tensor's bytes are cached only while the cache holds at most ``SEND_CACHE_BYTES``;
  past that, a site that asks for a tensor gets it serialized for itself.
* **Replies in flight.** Every reply to a site's download request is a tensor serialized,
  packed into a message (a second copy) and streamed in chunks; each site keeps one request
  open and asks for the next while it stores the last, and NVFlare serializes up to two
  tensors ahead for each. With 8 sites memray found ten packed replies, eight read-ahead
  tensors and thirty chunks alive at once (~140 MiB, 0.33x a 425 MB model). Here every
  reply takes its tensors' bytes from one ``SEND_WINDOW_BYTES`` window for the whole
  process, from before it is serialized until its last chunk is acknowledged; a site whose
  request does not fit waits its turn (a tensor larger than the window goes alone), and
  there is no read-ahead. What the server holds in flight no longer depends on the number
  of sites. The cost: at most a window's worth of replies is on the wire at once, which
  matters only where each site's own link, not the server, limits the transfer (the sites'
  task timeout allows for the sites being served one after another:
  fedllm.federation.transfer).
* **Sent streams.** Each sent reply is a ``TxTask`` its ``StreamFuture`` points back at: a
  reference cycle freed only by a full garbage collection (memray, 4 sites: 37 sent replies,
  190 MiB, alive at the job's peak). :func:`free_sent_streams` breaks the cycle when the
  stream is done.
* **Updates received.** The server downloads each site's update (to disk, with tensor disk
  offload) as the site submits it, every site at once: each download holds a reply being
  received, its decoded copy and the next one pipelined (memray, 16 sites: 130 MiB, 0.32x
  the model, at the job's peak). :func:`receive_updates_a_few_at_a_time` lets
  ``RECEIVE_AT_ONCE`` downloads run at a time; a site's submission waits for its turn
  (fedllm.federation.transfer sizes the submission timeout for the queue).

What every site receives is unchanged. The torch tensor decomposer registered in the sending
process makes these downloadables instead of NVFlare's (:func:`bound_the_send_cache`, called
by fedllm's persistor). It subclasses NVFlare 2.9's ``TensorDownloadable`` and reimplements
its cache's private methods; :func:`check_nvflare_send_cache` and
:func:`check_nvflare_stream_future` fail loudly, naming the version, if they moved.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Optional

#: bytes of serialized tensors the server keeps for the sites still to download them
SEND_CACHE_BYTES = 64 << 20
#: bytes of tensors in replies on their way to the sites at once, all sites together
SEND_WINDOW_BYTES = 32 << 20
#: longest a site's request waits for room in the window before it is served anyway
#: (a stalled site's reply must not hold the others back for good)
SEND_WINDOW_WAIT_S = 60.0
#: sites' updates the server downloads at once
RECEIVE_AT_ONCE = 2
#: longest a site's update waits for its turn before it is downloaded anyway
RECEIVE_WAIT_S = 600.0
#: transfers one window keeps waiting at most; more are served at once. A waiting transfer
#: holds one of NVFlare's 64 callback threads (``CALLBACK_THREAD_POOL_SIZE``), which the
#: transfers in flight need for their replies: the two windows keep at most half waiting.
MAX_WAITING = 16

_log = logging.getLogger(__name__)


class TransferWindow:
    """A budget (bytes, or transfers) shared by a process's transfers: :meth:`take` blocks
    until ``amount`` fits (or alone when nothing else is in flight); after ``wait_s``, or
    when ``max_waiting`` transfers wait already, it is served past the budget (an overrun).
    :meth:`give_back` returns it."""

    def __init__(self, capacity: int, wait_s: float = SEND_WINDOW_WAIT_S, max_waiting: int = MAX_WAITING):
        if capacity <= 0:
            raise ValueError(f"capacity={capacity}: expected > 0")
        self.capacity = capacity
        self.wait_s = wait_s
        self.max_waiting = max_waiting
        self.waiting = 0
        self.in_flight = 0
        #: the most ever in flight at once (tests read it)
        self.peak = 0
        #: takes served past the budget
        self.overruns = 0
        self._room = threading.Condition()

    def take(self, amount: int) -> bool:
        """Whether ``amount`` fit within the window (False: an overrun)."""
        deadline = time.monotonic() + self.wait_s
        with self._room:
            if self._fits(amount):
                return self._add(amount)
            if self.waiting >= self.max_waiting:
                return self._overrun(amount, f"{self.waiting} transfers wait already")
            self.waiting += 1
            try:
                while not self._fits(amount):
                    left = deadline - time.monotonic()
                    if left <= 0 or (not self._room.wait(left) and not self._fits(amount)):
                        return self._overrun(amount, f"after {self.wait_s:.0f} s")
            finally:
                self.waiting -= 1
            return self._add(amount)

    def _fits(self, amount: int) -> bool:
        return not self.in_flight or self.in_flight + amount <= self.capacity

    def _add(self, amount: int) -> bool:
        self.in_flight += amount
        self.peak = max(self.peak, self.in_flight)
        return True

    def _overrun(self, amount: int, why: str) -> bool:
        self.overruns += 1
        self._add(amount)
        _log.warning("transfer window: %d served past the window of %d, %s", amount, self.capacity, why)
        return False

    def give_back(self, amount: int) -> None:
        with self._room:
            self.in_flight -= amount
            self._room.notify_all()

    def take_for_reply(self, nbytes: int) -> None:
        """:meth:`take` for the reply this thread is building; the thread's next sent
        stream gives the bytes back when it is done (:func:`free_sent_streams`). The
        reply's later tensors (small ones share a reply up to NVFlare's chunk size) are
        taken without waiting: a thread holding part of the window never waits for more."""
        taken = _taken_for_reply()
        if taken:
            with self._room:
                self._add(nbytes)
        else:
            self.take(nbytes)
        taken.append((self, nbytes))


#: the process's one window (made by bound_the_send_cache)
_window: Optional[TransferWindow] = None
# What a download handler thread took for the reply it is building: NVFlare's cell builds
# the reply (CacheableObject.produce) and streams it (ByteStreamer.send) on that same
# thread, one after the other; the send hands the bytes to the stream.
_reply = threading.local()


def _taken_for_reply() -> list:
    if not hasattr(_reply, "taken"):
        _reply.taken = []
    return _reply.taken


def _hand_reply_bytes_to(future) -> None:
    taken = _taken_for_reply()
    if taken:
        _reply.taken = []
        for window, nbytes in taken:
            future.add_done_callback(window.give_back, nbytes)


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


def bound_the_send_cache(cache_bytes: int = SEND_CACHE_BYTES, window_bytes: int = SEND_WINDOW_BYTES) -> None:
    """Make this process serialize torch tensors for download with a cache of at most
    ``cache_bytes`` and replies in flight within ``window_bytes``, and free its sent
    streams at once (see the module). Idempotent (the first call's sizes stay)."""
    global _window
    import types

    check_nvflare_send_cache()
    free_sent_streams()
    if _window is None:
        _window = TransferWindow(window_bytes)
    # The registered instance also downloads (its Datum handlers keep what it received), so
    # only the way it makes a downloadable changes, on that very instance.
    decomposer = _registered_tensor_decomposer()
    downloadable = _downloadable_class()

    def to_downloadable(self, items: dict, max_chunk_size: int, fobs_ctx: dict):
        return downloadable(items, max_chunk_size, cache_bytes, _window)

    decomposer.to_downloadable = types.MethodType(to_downloadable, decomposer)


def receive_updates_a_few_at_a_time(at_once: int = RECEIVE_AT_ONCE) -> None:
    """Make this process download at most ``at_once`` sites' tensors at a time (see the
    module). Idempotent (the first call's number stays)."""
    import types

    import nvflare
    from nvflare.app_opt.pt.decomposers import TensorDecomposer

    if not callable(getattr(TensorDecomposer, "download", None)):
        raise RuntimeError(f"nvflare {nvflare.__version__}: TensorDecomposer.download moved; "
                           "fedllm.federation.sending was written for NVFlare 2.9's ViaDownloaderDecomposer")
    check_nvflare_send_cache()
    decomposer = _registered_tensor_decomposer()
    if getattr(decomposer, "receive_window", None) is not None:
        return
    nvflare_download = decomposer.download
    window = decomposer.receive_window = TransferWindow(at_once, wait_s=RECEIVE_WAIT_S)

    def download(self, *args, **kwargs):
        window.take(1)
        try:
            return nvflare_download(*args, **kwargs)
        finally:
            window.give_back(1)

    decomposer.download = types.MethodType(download, decomposer)


def _registered_tensor_decomposer():
    """The torch tensor decomposer this process's FOBS uses (NVFlare's TensorDecomposer,
    registered here where it is not yet)."""
    import torch
    from nvflare.app_opt.pt.decomposers import TensorDecomposer
    from nvflare.fuel.utils import fobs
    from nvflare.fuel.utils.fobs import fobs as fobs_module
    from nvflare.fuel.utils.fobs.fobs import get_class_name

    fobs.register(TensorDecomposer)  # a no-op where one is registered already
    return fobs_module._decomposers[get_class_name(torch.Tensor)]


def free_sent_streams() -> None:
    """Make each stream this process sends free its bytes the moment it is sent. Idempotent.

    NVFlare 2.9 streams every reply, each chunk of a downloaded tensor included, as a
    ``TxTask`` that holds the encoded reply and a 1 MiB buffer, and whose ``StreamFuture``
    points back at it (``task_handle``): a reference cycle, freed only by a full garbage
    collection, by which time the task sits in the oldest generation. memray on the server
    job of B3 (106M model, 4 sites) found 37 sent replies (190 MiB, 0.45x the model) alive
    at the job's peak. Dropping the future's pointer once the stream is done leaves no cycle,
    so reference counting frees the task and its bytes when its sending thread lets go.
    """
    from nvflare.fuel.f3.streaming.byte_streamer import ByteStreamer

    if getattr(ByteStreamer.send, "_fedllm_frees_sent_streams", False):
        return
    check_nvflare_stream_future()
    nvflare_send = ByteStreamer.send

    def send(self, *args, **kwargs):
        future = nvflare_send(self, *args, **kwargs)
        future.add_done_callback(_forget_task, future)
        _hand_reply_bytes_to(future)
        return future

    send._fedllm_frees_sent_streams = True
    ByteStreamer.send = send


def _forget_task(future) -> None:
    # a done future has no use for its task (cancel() returns before reaching it)
    future.task_handle = None


def check_nvflare_stream_future() -> None:
    """The NVFlare internals :func:`free_sent_streams` relies on, or a RuntimeError naming the version."""
    import inspect

    import nvflare
    from nvflare.fuel.f3.streaming.byte_streamer import ByteStreamer
    from nvflare.fuel.f3.streaming.stream_types import StreamFuture

    future = StreamFuture(0, task_handle=None)
    if (not hasattr(future, "task_handle") or not callable(getattr(future, "add_done_callback", None))
            or "stream" not in inspect.signature(ByteStreamer.send).parameters):
        raise RuntimeError(f"nvflare {nvflare.__version__}: StreamFuture.task_handle or ByteStreamer.send moved; "
                           "fedllm.federation.sending was written for NVFlare 2.9's streaming")


def _downloadable_class():
    from nvflare.app_opt.pt.tensor_downloader import TensorDownloadable

    class BoundedCacheTensorDownloadable(TensorDownloadable):
        """NVFlare's TensorDownloadable whose cache of serialized tensors holds at most
        ``cache_bytes`` and whose replies take their tensors' bytes from ``window``."""

        def __init__(self, tensors: dict, max_chunk_size: int, cache_bytes: int, window: Optional[TransferWindow] = None):
            super().__init__(tensors, max_chunk_size)
            self.cache_bytes = cache_bytes
            self.cached_bytes = 0
            self.window = window

        def prefetch_item(self, index: int) -> None:
            pass  # no read-ahead: it would serialize tensors outside the send window

        def _get_item(self, index: int, requester: str) -> bytes:
            if self.window is not None:
                self.window.take_for_reply(self.get_item_size(index) or 0)
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
