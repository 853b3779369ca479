"""A site's update as NVFlare's tensor disk offload hands it to the aggregator."""

from __future__ import annotations

from pathlib import Path


def as_offloaded(folder: Path, site: str, params: dict) -> dict:
    """``params`` as NVFlare's tensor disk offload hands them over: lazy refs to a
    safetensors file in ``folder / site``."""
    from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict
    from safetensors.torch import save_file

    site_dir = folder / site
    site_dir.mkdir()
    save_file(params, str(site_dir / "update.safetensors"))
    lazy = LazyTensorDict({name: (str(site_dir / "update.safetensors"), name) for name in params}, str(site_dir))
    return {name: lazy.make_lazy_ref(name) for name in params}


def offloaded_file(path: Path, names: list[str], temp_dir: Path) -> dict:
    """Lazy refs to the tensors ``names`` of the safetensors file ``path`` already on disk (as
    NVFlare's offload leaves them), without reading it; ``temp_dir`` is the offload's own
    folder, which NVFlare removes once the refs are gone."""
    from nvflare.app_opt.pt.lazy_tensor_dict import LazyTensorDict

    temp_dir.mkdir(parents=True, exist_ok=True)
    lazy = LazyTensorDict({name: (str(path), name) for name in names}, str(temp_dir))
    return {name: lazy.make_lazy_ref(name) for name in names}
