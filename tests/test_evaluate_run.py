"""``evaluate_model``, what ``fedllm evaluate`` runs: the same numbers as a direct
``lm_eval.simple_evaluate`` call, a summary written atomically, task data from a folder,
the environment or S3, and one-line errors for bad input."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from s3server import BUCKET, s3_server  # noqa: F401 (fixture)

from fedllm.config import TinyModelSpec
from fedllm.errors import FedllmError
from fedllm.evaluate import TASK_NAMES, evaluate_model
from fedllm.evaluate.model import CPU_BATCH_SIZE, hflm_settings, resolve_batch_size, resolve_dtype
from fedllm.hardware import cpu_has_native_bf16
from fedllm.evaluate.tasks import piqa, winogrande, write_task_folder

from conftest import SHARED_DATA as DATA  # the checkout's ../shared/data
LIMIT = 15


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from fedllm.train.model import build_tiny_model

    texts = [f"{d['goal']} {d['sol1']} {d['sol2']}" for d in piqa.read_docs(DATA)[:600]]
    texts += [d["sentence"] for d in winogrande.read_docs(DATA)[:600]]
    spec = TinyModelSpec(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128, vocab_size=1024)
    return build_tiny_model(spec, texts, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def lora_adapter(tiny_model, tmp_path_factory):
    import torch
    from peft import LoraConfig, TaskType, get_peft_model

    from fedllm.train.model import load_causal_lm

    torch.manual_seed(3)
    model = get_peft_model(load_causal_lm(tiny_model), LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.5)
    out = tmp_path_factory.mktemp("lora")
    model.save_pretrained(out)
    return out


def test_evaluate_model_agrees_exactly_with_a_direct_lm_eval_call(tiny_model, lora_adapter, tmp_path):
    import lm_eval
    from lm_eval.tasks import TaskManager

    output = tmp_path / "eval" / "global.json"
    result = evaluate_model(tiny_model, lora_adapter, limit=LIMIT, batch_size=8, task_data=DATA, device="cpu", output=output)

    # lm-eval given the dtype fedllm chose (bf16 on a CPU with native bf16) and its settings
    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model), "peft": str(lora_adapter), **hflm_settings(result["dtype"])},
        tasks=list(TASK_NAMES),
        task_manager=TaskManager(include_path=str(write_task_folder(DATA, tmp_path / "tasks")), include_defaults=False),
        limit=LIMIT,
        batch_size=8,
        device="cpu",
    )["results"]
    expected = {
        "hellaswag/acc": (direct["hellaswag"]["acc,none"], direct["hellaswag"]["acc_stderr,none"]),
        "hellaswag/acc_norm": (direct["hellaswag"]["acc_norm,none"], direct["hellaswag"]["acc_norm_stderr,none"]),
        "piqa/acc": (direct["piqa"]["acc,none"], direct["piqa"]["acc_stderr,none"]),
        "piqa/acc_norm": (direct["piqa"]["acc_norm,none"], direct["piqa"]["acc_norm_stderr,none"]),
        "winogrande/acc": (direct["winogrande"]["acc,none"], direct["winogrande"]["acc_stderr,none"]),
    }
    for key, (value, stderr) in expected.items():
        assert result["metrics"][key] == {"value": value, "stderr": stderr}, key
    values = [v for v, _ in expected.values()]
    assert result["metrics"]["mean"]["value"] == pytest.approx(sum(values) / 5, abs=1e-12)
    assert result["metrics"]["mean"]["stderr"] == pytest.approx(math.sqrt(sum(s * s for _, s in expected.values())) / 5, abs=1e-12)
    assert result["n_docs"] == {"hellaswag": LIMIT, "piqa": LIMIT, "winogrande": LIMIT}
    assert result["model"] == str(tiny_model) and result["adapter"] == str(lora_adapter) and result["limit"] == LIMIT
    assert result["source"] == "offline" and result["task_data"] == str(DATA) and result["device"] == "cpu"
    assert result["seconds"] > 0
    assert json.loads(output.read_text()) == result
    assert [p.name for p in output.parent.iterdir()] == ["global.json"]  # no temporary file left behind


def test_cpu_defaults_are_a_fixed_batch_and_native_bf16_scored_as_lm_eval_scores_them(tiny_model, tmp_path):
    """On a CPU, "auto" is batch 16 (not lm-eval's probe) and bf16 where the CPU multiplies
    it natively; lm-eval's own hf model given those settings scores the same to the last digit."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    result = evaluate_model(tiny_model, tasks=("piqa", "winogrande"), limit=LIMIT, task_data=DATA, device="cpu")
    expected_dtype = "bfloat16" if cpu_has_native_bf16() else "float32"
    assert result["batch_size"] == "auto" and result["batch_size_used"] == CPU_BATCH_SIZE == 16
    assert result["dtype"] == expected_dtype

    direct = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(tiny_model), **hflm_settings(expected_dtype)},
        tasks=["piqa", "winogrande"],
        task_manager=TaskManager(include_path=str(write_task_folder(DATA, tmp_path / "tasks")), include_defaults=False),
        limit=LIMIT,
        batch_size=16,
        device="cpu",
    )["results"]
    assert result["metrics"]["piqa/acc"]["value"] == direct["piqa"]["acc,none"]
    assert result["metrics"]["piqa/acc_norm"]["value"] == direct["piqa"]["acc_norm,none"]
    assert result["metrics"]["winogrande/acc"]["value"] == direct["winogrande"]["acc,none"]

    fp32 = evaluate_model(tiny_model, tasks=("winogrande",), limit=3, batch_size=2, task_data=DATA, device="cpu", dtype="float32")
    assert fp32["dtype"] == "float32" and fp32["batch_size_used"] == 2


def test_gpu_keeps_lm_evals_probe_and_the_models_dtype():
    assert resolve_batch_size("auto", "cuda") == "auto" and resolve_batch_size("auto", "cuda:1") == "auto"
    assert resolve_batch_size(8, "cuda") == 8 and resolve_batch_size(8, "cpu") == 8
    assert resolve_dtype("auto", "cuda") == "auto" and resolve_dtype("float32", "cpu") == "float32"
    assert hflm_settings("bfloat16") == {"dtype": "bfloat16", "softmax_dtype": "float32"}
    assert hflm_settings("float32") == {"dtype": "float32"}


def test_only_the_tasks_asked_for_are_reported_with_data_from_the_environment(tiny_model, monkeypatch):
    monkeypatch.setenv("FEDLLM_EVAL_DATA_DIR", str(DATA))
    result = evaluate_model(tiny_model, tasks="winogrande", limit=5, batch_size=4, device="cpu")
    assert set(result["metrics"]) == {"winogrande/acc", "mean"}
    acc = result["metrics"]["winogrande/acc"]
    assert result["metrics"]["mean"] == pytest.approx(acc)  # the mean of one metric is that metric
    assert result["n_docs"] == {"winogrande": 5} and result["adapter"] is None


def test_task_data_and_model_from_s3(s3_server, tiny_model, tmp_path):
    from fedllm.store import bundle

    task_data = tmp_path / "eval-data"
    shutil.copytree(DATA / "piqa", task_data / "piqa")
    bundle(task_data, f"s3://{BUCKET}/eval-data")
    bundle(tiny_model, f"s3://{BUCKET}/models/tiny")

    remote = evaluate_model(f"s3://{BUCKET}/models/tiny", tasks=("piqa",), limit=5, batch_size=4, task_data=f"s3://{BUCKET}/eval-data", device="cpu")
    local = evaluate_model(tiny_model, tasks=("piqa",), limit=5, batch_size=4, task_data=DATA, device="cpu")
    assert remote["metrics"] == local["metrics"]
    assert remote["task_data"] == f"s3://{BUCKET}/eval-data" and remote["model"] == f"s3://{BUCKET}/models/tiny"


# ---------------------------------------------------------------- bad input, one line each


def one_line_error(match: str, **kwargs) -> str:
    with pytest.raises(FedllmError, match=match) as e:
        evaluate_model(**kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_model_directory_without_weights(tiny_model, tmp_path):
    no_weights = tmp_path / "no-weights"
    shutil.copytree(tiny_model, no_weights)
    (no_weights / "model.safetensors").unlink()
    one_line_error(r"model path .*no-weights: no weights", model_path=no_weights, task_data=DATA, limit=2)


def test_unknown_task_lists_the_allowed_ones(tiny_model):
    one_line_error(r"unknown evaluation task 'mmlu'; choose from hellaswag, piqa, winogrande", model_path=tiny_model, tasks=("piqa", "mmlu"), task_data=DATA)


def test_malformed_task_row_is_named_before_the_model_loads(tmp_path):
    data = tmp_path / "data"
    shutil.copytree(DATA / "piqa", data / "piqa")
    lines = (data / "piqa/valid.jsonl").read_text().splitlines()
    lines[9] = '{"goal": "Open a jar", "sol1": "Twist the lid"}'
    (data / "piqa/valid.jsonl").write_text("\n".join(lines) + "\n")
    # The model path is never looked at: the rows are checked first.
    one_line_error(r"piqa/valid\.jsonl:10: missing field 'sol2'", model_path=tmp_path / "not-loaded", tasks=("piqa",), task_data=data, limit=2)


def test_missing_task_data_says_where_to_put_it(tiny_model, tmp_path, monkeypatch):
    monkeypatch.delenv("FEDLLM_EVAL_DATA_DIR", raising=False)
    one_line_error(r"no task data: .*set FEDLLM_EVAL_DATA_DIR, or use source 'hub'", model_path=tiny_model)
    one_line_error(r"task data .*nowhere: not a directory", model_path=tiny_model, task_data=tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        ({"limit": 0}, r"evaluation limit 0: expected a positive number"),
        ({"limit": 0.5}, r"evaluation limit 0.5: expected a positive number"),
        ({"batch_size": "large"}, r"evaluation batch size 'large': expected 'auto' or a positive integer"),
        ({"dtype": "half"}, r"evaluation dtype 'half': expected one of auto, float32, bfloat16, float16"),
        ({"source": "web"}, r"evaluation source 'web': expected one of offline, hub"),
        ({"source": "hub"}, r"task data .*: only used with source 'offline'"),
    ],
)
def test_bad_settings(tiny_model, setting, match):
    one_line_error(match, model_path=tiny_model, task_data=DATA, **setting)
