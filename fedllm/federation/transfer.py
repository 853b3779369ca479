"""NVFlare's transfer timeouts, sized from the exchanged model's bytes.

NVFlare 2.9 bounds a model's trip between the server and a site with five timeouts whose
defaults suit models of megabytes; a multi-GB exchange outlives some of them. fedllm derives
each from the exchanged weights' bytes at ``federation.min_bandwidth_mb_s`` (the bandwidth the
round timeout assumes too: fedllm.federation.participation), never below NVFlare's own default,
and ``federation.transfer_timeouts`` overrides any of them by name. The values land in the
exported job's config (top level of ``config_fed_client.json`` / ``config_fed_server.json``,
where NVFlare's ``ConfigService`` reads a job's variables), and the run's summary records them.

Two kinds of bound, so each is derived from the bytes it really waits for:

- a whole model: a site's task request waits for the global model's download, its result
  submission for the server to take its update (``get_task_timeout``,
  ``submit_task_result_timeout``: ``nvflare/private/fed/client/client_runner.py``);
- one chunk of it: tensors stream in chunks of ``TENSOR_CHUNK_BYTES``; a chunk request has
  ``tensor_streaming_per_request_timeout``, and the sender drops a download with no request for
  ``tensor_min_download_timeout`` (default: ``streaming_idle_timeout``) seconds
  (``nvflare/fuel/utils/fobs/decomposers/via_downloader.py``, ``_monitor_tx`` in
  ``nvflare/fuel/f3/streaming/download_service.py``). Raising these with the model's size
  would only make a dead peer take longer to notice.

Not here, on purpose: NVFlare 2.7's ``submit_result_timeout`` and ``max_resends`` (2.9 reads
neither from a job's config), and ``streaming_read_timeout`` / ``streaming_ack_wait`` (read
from a participant's ``comm_config.json``, not from a job, and only by byte streams). A site's
training process, which sends its update to the server itself, does not load the job's config:
its side of that download keeps NVFlare's 600 s inactivity bound (``NVFLARE_*`` environment
variables reach it).
"""

from __future__ import annotations

import json
import math
from typing import Mapping, Optional

from fedllm.errors import FedllmError

#: each derived bound is this many times the transfer's time at the minimum bandwidth
HEADROOM = 2.0
#: bytes per tensor chunk: NVFlare's TensorDecomposer default (``tensor_download_chunk_size``)
TENSOR_CHUNK_BYTES = 2 * 1024 * 1024

#: key -> (NVFlare 2.9's default in seconds, what it waits for: "model" or "chunk")
TIMEOUTS: dict[str, tuple[float, str]] = {
    # client_runner.py: unset, the client's communication_timeout (fed_client_base.py: 300 s)
    "get_task_timeout": (300.0, "model"),
    "submit_task_result_timeout": (300.0, "model"),
    # via_downloader.py: per-request default 600 s; min download timeout defaults to
    # streaming_idle_timeout (transfer_progress.DEFAULT_STREAMING_IDLE_TIMEOUT, 600 s)
    "tensor_streaming_per_request_timeout": (600.0, "chunk"),
    "tensor_min_download_timeout": (600.0, "chunk"),
    "streaming_idle_timeout": (600.0, "chunk"),
}
#: the keys the server's job process reads too: it sends the global model and downloads updates
SERVER_KEYS = ("tensor_streaming_per_request_timeout", "tensor_min_download_timeout", "streaming_idle_timeout")

#: ``federation.exchange_dtype`` values whose weights travel in 2 bytes (any other: fp32, 4 bytes)
_HALF_DTYPES = ("bfloat16", "float16", "bf16", "fp16", "half")


def check_transfer_timeouts(overrides: Mapping[str, float], field: str = "federation.transfer_timeouts") -> None:
    """Raise FedllmError naming ``field`` for an unknown key or a value that is not a positive,
    finite number of seconds."""
    for key, value in (overrides or {}).items():
        if key not in TIMEOUTS:
            raise FedllmError(
                f"config field '{field}.{key}' is unknown; allowed keys: {', '.join(sorted(TIMEOUTS))}"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
            raise FedllmError(f"config field '{field}.{key}': expected a number of seconds > 0, got {value!r}")


def transfer_settings(model_bytes: int, min_bandwidth: float, overrides: Optional[Mapping[str, float]] = None,
                      sites: int = 1) -> dict:
    """Every timeout of :data:`TIMEOUTS`, in seconds, for an exchanged model of ``model_bytes``
    at ``min_bandwidth`` bytes/s among ``sites``: ``HEADROOM`` × the bytes it waits for /
    ``min_bandwidth``, rounded up to a whole second and never below NVFlare's default; an
    ``overrides`` entry wins as given. Non-decreasing in ``model_bytes`` and ``sites``. Raises
    FedllmError for an unknown override.

    The server sends the global model within one window for all sites and downloads updates
    a few sites at a time (fedllm.federation.sending), so a site may wait for the others: its
    task request for up to every site's download (the window can serve them one after
    another), its result submission for ``ceil(sites / RECEIVE_AT_ONCE)`` updates."""
    from fedllm.federation.sending import RECEIVE_AT_ONCE

    if model_bytes < 0:
        raise FedllmError(f"model_bytes={model_bytes}: expected >= 0")
    if sites < 1:
        raise FedllmError(f"sites={sites}: expected >= 1")
    if not min_bandwidth > 0:
        raise FedllmError(f"config field 'federation.min_bandwidth_mb_s': must be > 0, got {min_bandwidth / 1e6}")
    check_transfer_timeouts(overrides or {})
    queued = {"get_task_timeout": sites, "submit_task_result_timeout": math.ceil(sites / RECEIVE_AT_ONCE)}
    settings = {}
    for key, (default, waits_for) in TIMEOUTS.items():
        waited = model_bytes * queued.get(key, 1) if waits_for == "model" else min(model_bytes, TENSOR_CHUNK_BYTES)
        settings[key] = max(default, float(math.ceil(HEADROOM * waited / min_bandwidth)))
    settings.update({key: float(value) for key, value in (overrides or {}).items()})
    return settings


def exchanged_model_bytes(cfg, layout) -> int:
    """Bytes of the weights a site and the server exchange: ``trainable_parameters`` of the run
    dir's model.json (the adapter for PEFT, every weight for full fine-tuning) × the bytes of
    ``federation.exchange_dtype`` (2 for bfloat16/float16, else 4: fp32). 0 where the run dir has no model.json yet
    (a recipe built outside ``fedllm run``): NVFlare's defaults then."""
    path = layout.model_info
    if not path.is_file():
        return 0
    parameters = json.loads(path.read_text()).get("trainable_parameters")
    if isinstance(parameters, bool) or not isinstance(parameters, int) or parameters < 0:
        raise FedllmError(f"{path}: trainable_parameters: expected an integer >= 0, got {parameters!r}")
    dtype = str(getattr(cfg.federation, "exchange_dtype", None) or "float32").removeprefix("torch.")
    return parameters * (2 if dtype in _HALF_DTYPES else 4)


def run_transfer_settings(cfg, layout, sites: int) -> dict:
    """:func:`transfer_settings` for a run of ``sites``: its exchanged model,
    ``federation.min_bandwidth_mb_s`` and ``federation.transfer_timeouts``. What the job carries
    and the summary records."""
    federation = cfg.federation
    return transfer_settings(exchanged_model_bytes(cfg, layout), float(federation.min_bandwidth_mb_s) * 1e6,
                             getattr(federation, "transfer_timeouts", None), sites=sites)


def add_transfer_timeouts(recipe, settings: Mapping[str, float]) -> None:
    """Put ``settings`` (:func:`transfer_settings`) in the recipe's job config, in place: every key
    on the sites, :data:`SERVER_KEYS` on the server too."""
    recipe.add_client_config(dict(settings))
    recipe.add_server_config({key: settings[key] for key in SERVER_KEYS if key in settings})
