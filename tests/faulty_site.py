"""A site that misbehaves on purpose, started as a site process of a real federation.

    python = wrapper(tmp_path, {"site-1": "nan", "site-2": "shape"}, sent_dir)
    simulate(cfg, run, sites, site_python=str(python))
    sent = read_sent(sent_dir)  # site -> (the params it sent, its FedAvg weight)

``build_recipe(site_python=...)`` starts every site with ``<python> -u -m
fedllm.federation.client <script> --run-dir RUN``. The wrapper drops ``-u -m
fedllm.federation.client`` and runs this file instead, which wraps the Lightning Client
API's ``send`` and then runs ``fedllm.federation.client.main`` unchanged: the sites named in
``$FEDLLM_TEST_FAULTS`` (``site=fault,...``) spoil their training result, every site writes
what it sent to ``$FEDLLM_TEST_SENT_DIR``. No test hook lives in the library.
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

FAULTS_ENV = "FEDLLM_TEST_FAULTS"
SENT_DIR_ENV = "FEDLLM_TEST_SENT_DIR"
HUGE = 1e4  # added to every entry of one tensor: a norm far above any bound a test sets


def _first_float(params: dict) -> str:
    return next(name for name, value in params.items() if value.is_floating_point() and value.numel() > 1)


def spoil(params: dict, fault: str) -> dict:
    """``params`` with one tensor spoiled: a NaN in it, an extra row, or ``HUGE`` added."""
    import torch

    params = {name: value.detach().clone() for name, value in params.items()}
    name = _first_float(params)
    if fault == "nan":
        params[name].view(-1)[0] = float("nan")
    elif fault == "shape":
        params[name] = torch.zeros((params[name].shape[0] + 1, *params[name].shape[1:]), dtype=params[name].dtype)
    elif fault == "norm":
        params[name] += HUGE
    else:
        raise ValueError(f"{FAULTS_ENV}: unknown fault {fault!r}; expected nan, shape or norm")
    return params


def wrapper(folder: Path, faults: dict[str, str], sent_dir: Path) -> Path:
    """An executable to pass as ``site_python``: each site runs through this file, the sites
    in ``faults`` (site -> nan | shape | norm) misbehaving, every site recording to ``sent_dir``."""
    sent_dir.mkdir(parents=True, exist_ok=True)
    path = folder / "faulty-python"
    path.write_text(
        "#!/bin/sh\n"
        "# NVFlare starts: <this> -u -m fedllm.federation.client <job's script> --run-dir RUN\n"
        '[ "$1" = -u ] && shift\n'
        '[ "$1" = -m ] && shift 2\n'
        f"export {FAULTS_ENV}='{','.join(f'{site}={fault}' for site, fault in faults.items())}'\n"
        f"export {SENT_DIR_ENV}='{sent_dir}'\n"
        f'exec "{sys.executable}" -u "{Path(__file__).resolve()}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def read_sent(sent_dir: Path) -> dict[str, tuple[dict, float]]:
    """site -> (the params its last round's result carried, its FedAvg weight), as the server got them."""
    from safetensors.torch import load_file

    sent = {}
    for meta_file in sorted(sent_dir.glob("*.json")):
        meta = json.loads(meta_file.read_text())
        sent[meta["site"]] = (load_file(str(meta_file.with_suffix(".safetensors"))), meta["weight"])
    return sent


def main() -> None:
    import nvflare.app_opt.lightning.api as lightning_api
    from nvflare.app_common.abstract.fl_model import MetaKey
    from nvflare.client import get_site_name
    from safetensors.torch import save_file

    from fedllm.federation import client

    faults = dict(item.split("=", 1) for item in os.environ.get(FAULTS_ENV, "").split(",") if item)
    sent_dir = Path(os.environ[SENT_DIR_ENV])
    send = lightning_api.send

    def send_spoiled(model, *args, **kwargs):
        if model.params:  # a training result; validation results carry metrics only
            site = get_site_name()
            if site in faults:
                model.params = spoil(model.params, faults[site])
            # one file per site: its last round's result
            save_file({k: v.detach().contiguous().clone() for k, v in model.params.items()}, str(sent_dir / f"{site}.safetensors"))
            weight = (model.meta or {}).get(MetaKey.NUM_STEPS_CURRENT_ROUND)
            (sent_dir / f"{site}.json").write_text(json.dumps({"site": site, "weight": weight, "fault": faults.get(site)}))
        return send(model, *args, **kwargs)

    lightning_api.send = send_spoiled
    client.main()


if __name__ == "__main__":
    main()
