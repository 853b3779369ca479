"""How much memory the FedAvg server needs, derived from the model it aggregates, and the
process settings that keep it there.

fedllm's server keeps one copy of the global model plus what is in flight
(fedllm.federation.persistor, fedllm.federation.aggregation, fedllm.federation.sending).
B3 (bench/README.md) measured its job process at 1.19x / 1.31x / 1.48x the exchanged
model's bytes at 2 / 8 / 16 sites, net of what the process holds with no model at all
(what is in flight is bounded by fixed budgets, fedllm.federation.sending, not by the
number of sites). The rule below requests ``SERVER_MODEL_FACTOR`` x the model on top of
``SERVER_PROCESS_BASE_BYTES`` (the interpreter, NVFlare and torch of the server's two
processes, and those budgets); the chart's default memory request follows the same rule.
"""

from __future__ import annotations

import math

#: the server job process's peak per byte of the exchanged model, net of the process itself:
#: B3's highest (1.48x, 16 sites) with room to spare
SERVER_MODEL_FACTOR = 2.0
#: the server's two processes (parent and job) with a near-empty model, rounded up
SERVER_PROCESS_BASE_BYTES = 1 << 30


def server_memory_request(model_bytes: int) -> int:
    """Bytes to request for the server pod that aggregates a model of ``model_bytes``
    (the exchanged weights: the adapter for PEFT, everything for full fine-tuning), rounded
    up to a whole MiB."""
    if model_bytes < 0:
        raise ValueError(f"model_bytes={model_bytes}: expected >= 0")
    need = SERVER_PROCESS_BASE_BYTES + SERVER_MODEL_FACTOR * model_bytes
    return int(math.ceil(need / (1 << 20))) << 20


def peak_rss_since_reset(reset: bool = True) -> tuple[int | None, bool]:
    """(this process's peak resident memory in bytes since the last reset, whether the
    peak can be reset), from Linux's ``VmHWM``; with ``reset`` the peak then starts over
    at the current resident size (``/proc/self/clear_refs``, value 5), so the next call
    reads the next round's peak. (None, False) where there is no /proc (macOS, Windows).
    Where the reset is refused, the peak is the process's since it started."""
    peak = _proc_status_bytes("VmHWM")
    if peak is None:
        return None, False
    if not reset:
        return peak, True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return peak, False
    return peak, True


def current_rss() -> int | None:
    """This process's resident memory now, in bytes (Linux ``VmRSS``); None without /proc."""
    return _proc_status_bytes("VmRSS")


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status in bytes; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            line = next((line for line in f if line.startswith(field + ":")), None)
    except OSError:
        return None
    return None if line is None else int(line.split()[1]) * 1024


#: glibc's mallopt parameter for the size from which an allocation gets its own mapping
_M_MMAP_THRESHOLD = -3


def return_large_frees_to_the_os(threshold: int = 1 << 20) -> bool:
    """Make every allocation of ``threshold`` bytes or more its own memory mapping, given back
    to the OS the moment it is freed (glibc ``mallopt(M_MMAP_THRESHOLD)``). Returns whether
    it took effect (False off glibc).

    glibc starts with such a threshold (128 KiB) but raises it to the size of each mapped
    block freed, up to 32 MiB: after the first round the server's per-tensor buffers (a
    tensor serialized for the sites, its float64 sum) come from the heap instead, and a
    freed heap block stays in the process's resident memory until the heap is trimmed —
    about a model's worth per round, across several threads' heaps. Setting the threshold
    fixes it where it is.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, int(threshold)))


def collect_garbage_every(seconds: float = 2.0) -> bool:
    """Run Python's full garbage collection every ``seconds`` in a daemon thread of this
    process. Returns False when one is running already.

    While the server sends the global model, NVFlare's transfer leaves each chunk it
    serialized (megabytes of bytes) referenced from reference cycles, freed only by a full
    collection, which CPython runs rarely in a process holding millions of long-lived
    objects: B3 saw the server's job process grow by over 3× the model during one round's
    transfers to 8 sites, and drop at once at the next full collection. A full collection
    every 2 s costs tens of milliseconds each.
    """
    import gc
    import threading

    if any(t.name == "fedllm-gc" for t in threading.enumerate()):
        return False

    def collect() -> None:
        while True:
            threading.Event().wait(seconds)
            gc.collect()

    threading.Thread(target=collect, name="fedllm-gc", daemon=True).start()
    return True
