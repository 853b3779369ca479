"""Base models: a hub id, a local HF directory, an s3:// copy of one, a GGUF file
(local, inside a Python package, or in S3), or a tiny model built from a config with a
tokenizer trained on the run's own data.

Every setting of a run (each site, the server, the baselines) loads the same
*prepared* base model directory, so the server's initial global model and every
site start from identical weights.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from fedllm.config import ModelConfig, TinyModelSpec
from fedllm.errors import FedllmError
from fedllm.train.methods import ParameterCount, apply_method, count_parameters

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: Path):
    """A byte-level BPE tokenizer trained on ``texts`` (seconds for a few MB).

    Byte-level means every string is encodable: no unknown tokens, whatever
    language or symbols the evaluation tasks contain.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS, show_progress=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    tok.save_pretrained(out_dir)
    return tok


def build_tiny_model(spec: TinyModelSpec, texts: Iterable[str], out_dir: str | os.PathLike, seed: int = 1234) -> Path:
    """Write a randomly initialised causal LM and its tokenizer to ``out_dir``.

    The result is an ordinary HF directory: ``AutoModelForCausalLM.from_pretrained``
    and lm-eval's ``hf`` backend load it like any hub model.
    """
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(texts, spec.vocab_size, out)
    common = dict(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    if spec.architecture == "llama":
        config = LlamaConfig(
            hidden_size=spec.hidden_size,
            intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_heads,
            max_position_embeddings=spec.max_position_embeddings,
            **common,
        )
    else:
        config = GPT2Config(
            n_embd=spec.hidden_size,
            n_inner=spec.intermediate_size,
            n_layer=spec.num_layers,
            n_head=spec.num_heads,
            n_positions=spec.max_position_embeddings,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out, safe_serialization=True)
    return out


def check_model_dir(path: str | os.PathLike) -> Path:
    """A local HF model directory with a config and weights, or a clear error."""
    p = Path(path)
    if not p.exists():
        raise FedllmError(f"model path {p}: does not exist")
    if not p.is_dir():
        raise FedllmError(f"model path {p}: is not a directory")
    if not (p / "config.json").is_file():
        raise FedllmError(f"model path {p}: no config.json (not a Hugging Face model directory)")
    if not any((p / w).is_file() for w in WEIGHT_FILES):
        raise FedllmError(f"model path {p}: no weights ({' or '.join(WEIGHT_FILES[:2])})")
    return p


def is_local_reference(source: str) -> bool:
    """Whether a model source names a local path rather than a hub id."""
    return source.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(source))


def link_or_copy_dir(source: Path, out: Path) -> Path:
    """``out`` as a copy of the folder ``source``: hard links where the file system allows
    (no bytes copied), plain copies elsewhere. Built beside ``out`` and renamed into place."""
    import shutil
    import tempfile

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copy2(src, dst)

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        shutil.copytree(source, staging / "copy", copy_function=link)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging / "copy", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def prepare_base_model(model_cfg: ModelConfig, out_dir: str | os.PathLike, texts_for_tokenizer: Optional[Iterable[str]] = None, seed: int = 1234) -> Path:
    """Make the run's base model directory ``out_dir`` and return it.

    Whatever the source, the run's base model ends up at ``out_dir``, an ordinary HF
    folder: every later step (sites, server, baselines, evaluation, the Kubeflow steps,
    the pods) reads it from there.

    * ``tiny``: build it (tokenizer trained on ``texts_for_tokenizer``).
    * a GGUF file (local, ``pkg://package/file.gguf``, ``s3://.../file.gguf``):
      dequantized into an HF folder once (fedllm.train.gguf).
    * a local HF folder: validated, then linked (or copied) into ``out_dir``.
    * ``s3://`` folder: downloaded once into ``out_dir`` (verified against its manifest).
    * hub id: downloaded once into ``out_dir`` with ``snapshot_download``
      (needs internet; air-gapped sites give a local path or s3:// instead).
    """
    from fedllm.train.gguf import convert_gguf, is_gguf_source, locate_gguf

    source = model_cfg.source
    out = Path(out_dir)
    if source == "tiny":
        if texts_for_tokenizer is None:
            raise FedllmError("model.source 'tiny' needs the run's training texts to train its tokenizer")
        if (out / "config.json").is_file():
            return check_model_dir(out)
        return build_tiny_model(model_cfg.tiny, texts_for_tokenizer, out, seed=seed)
    if is_gguf_source(source):
        import shutil

        download = out.parent / f".{out.name}-gguf"  # an s3:// file lands here, gone once converted
        try:
            return check_model_dir(convert_gguf(locate_gguf(source, download_dir=download), out))
        finally:
            shutil.rmtree(download, ignore_errors=True)
    if source.startswith("s3://"):
        from fedllm.store import fetch_dir

        return check_model_dir(fetch_dir(source, out))
    if is_local_reference(source):
        local = check_model_dir(os.path.expanduser(source))
        if local.resolve() == out.resolve():
            return local
        return check_model_dir(link_or_copy_dir(local, out))
    if source.count("/") != 1:
        raise FedllmError(
            f"config field 'model.source': {source!r} is neither 'tiny', a GGUF file (path, pkg:// or s3://), "
            "an existing local path, an s3:// URI, nor a hub id like 'org/name'"
        )
    if (out / "config.json").is_file():
        return check_model_dir(out)
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=source,
            revision=model_cfg.revision,
            local_dir=out,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"],
        )
    except Exception as e:  # network errors, gated repos, unknown ids
        raise FedllmError(f"config field 'model.source': could not download hub model {source!r}: {type(e).__name__}: {e}") from None
    return check_model_dir(out)


def load_tokenizer(model_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(model_dir: str | os.PathLike, dtype=None):
    """The base model as an HF causal LM, with SDPA attention where supported."""
    import torch
    from transformers import AutoModelForCausalLM

    check_model_dir(model_dir)
    kwargs = dict(dtype=dtype or torch.float32)
    try:
        return AutoModelForCausalLM.from_pretrained(str(model_dir), attn_implementation="sdpa", **kwargs)
    except (ValueError, ImportError):  # architectures without SDPA support
        return AutoModelForCausalLM.from_pretrained(str(model_dir), **kwargs)


def count_model_parameters(model_dir: str | os.PathLike, method_name: str, method_params: dict) -> ParameterCount:
    """The base model's and the method's trainable parameter counts, equal to those of the
    loaded model (:func:`fedllm.train.methods.count_parameters`), without reading a weight.

    The architecture is built from ``config.json`` on PyTorch's meta device, where a
    tensor has a shape and no storage, and the method applied to it: seconds and no
    memory even for a 20B model, which loaded would take 80 GB in fp32.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    check_model_dir(model_dir)
    config = AutoConfig.from_pretrained(str(model_dir))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        model = apply_method(model, method_name, method_params)
    return count_parameters(model, method_name)
