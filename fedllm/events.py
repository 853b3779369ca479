"""Structured event lines: one JSON object per line, to stdout and to a file.

The same lines appear in `make run`'s output, in a site pod's `kubectl logs`, and
in `<run>/events/<site>.jsonl`, from which the run summary is computed. Keys:
``ts``, ``event``, ``site``, ``round``, ``step``, ``loss``, ``tokens_per_s``,
``bytes_sent``, ``bytes_received`` and event-specific extras; absent keys are
simply left out.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

EVENTS_FILE_ENV = "FEDLLM_EVENTS_FILE"
QUIET_ENV = "FEDLLM_QUIET_EVENTS"

_lock = threading.Lock()
_listeners: list[Callable[[dict], None]] = []


def emit(event: str, file: Optional[str | os.PathLike] = None, **fields: Any) -> dict:
    """Write one event line. ``file`` (or ``$FEDLLM_EVENTS_FILE``) gets a copy."""
    record = {"ts": round(time.time(), 3), "event": event}
    record.update({k: _plain(v) for k, v in fields.items() if v is not None})
    line = json.dumps(record, sort_keys=False)
    # The run's own log file, and $FEDLLM_EVENTS_FILE: in a pod the chart points
    # it at /proc/1/fd/1, so `kubectl logs` shows the bare JSON line even when
    # NVFlare runs this code in a subprocess whose stdout it re-logs with prefixes.
    targets = {str(t) for t in (file, os.environ.get(EVENTS_FILE_ENV)) if t}
    with _lock:
        if not os.environ.get(QUIET_ENV):
            print(line, file=sys.stdout, flush=True)
        for target in targets:
            if not target.startswith("/proc/"):
                Path(target).parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a") as f:
                f.write(line + "\n")
    for listener in list(_listeners):
        listener(record)
    return record


def listen(listener: Callable[[dict], None]) -> Callable[[], None]:
    """Call ``listener(record)`` with every event this process emits from now on (after
    its line is written); returns the function that stops it. fedllm.tracking streams
    metrics to TensorBoard and MLflow this way."""
    _listeners.append(listener)
    return lambda: _listeners.remove(listener) if listener in _listeners else None


def read_events(path: str | os.PathLike) -> list[dict]:
    """Every event in a file; a torn last line (a killed process) is ignored."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _plain(v: Any) -> Any:
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float):
        return round(v, 6)
    return v
