"""``python -m pipelines submit``: start a run of the compiled pipeline on a Kubeflow cluster."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence

from fedllm.errors import FedllmError
from pipelines import COMPILED


def submit_run(
    config: str | os.PathLike,
    host: str,
    overrides: Sequence[str] = (),
    pipeline_yaml: str | os.PathLike = COMPILED,
    experiment: str = "fedllm",
    namespace: Optional[str] = None,
    token: Optional[str] = None,
    **parameters,
) -> tuple[str, str]:
    """Start one run on the Kubeflow Pipelines API at ``host``; return (run id, UI link).

    ``config``: a local YAML file (its text becomes the ``config`` parameter) or
    an ``s3://`` URI the partition step reads from MinIO. ``parameters``: the
    other pipeline parameters (``federation_mode``, ``shared_run_root``, ...).
    """
    import kfp

    config = str(config)
    if config.startswith("s3://"):
        text = config
    elif Path(config).is_file():
        from fedllm.config import load_config

        load_config(config, list(overrides))  # a bad config fails here, not in the cluster
        text = Path(config).read_text()
    else:
        raise FedllmError(f"{config}: config file not found (give a YAML file or an s3:// URI)")
    if not Path(pipeline_yaml).is_file():
        raise FedllmError(f"{pipeline_yaml}: compiled pipeline not found (run `python -m pipelines compile`)")
    client = kfp.Client(host=host, namespace=namespace or "kubeflow", existing_token=token, ui_host=host)
    try:
        result = client.create_run_from_pipeline_package(
            str(pipeline_yaml),
            arguments={"config": text, "overrides": list(overrides), **parameters},
            experiment_name=experiment,
            namespace=namespace,
        )
    except Exception as e:  # the API client raises urllib3 / ApiException types with multi-line bodies
        raise FedllmError(f"{host}: starting the run failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return result.run_id, f"{host.rstrip('/')}/#/runs/details/{result.run_id}"
