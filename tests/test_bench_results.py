"""The benchmarks' arithmetic: what they read from a run's events and how they size messages.

No timing is asserted here; these check that B1 reads round times and training times from
the events a federation writes, that B2's sizes come from the real tensors, and that the
one table names every number the result JSON holds.
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.b1_overhead import site_timings  # noqa: E402
from bench.b2_bytes import message_sizes  # noqa: E402
from bench.run_all import summary_rows  # noqa: E402


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_b1_reads_round_overhead_and_fixed_cost_from_events(tmp_path):
    # job starts at t=100; round 1 ends at 120 (start-up), rounds 2 and 3 take 4 s each
    _write(tmp_path / "events" / "server.jsonl", [
        {"ts": 100.0, "event": "job_start", "round": 0},
        {"ts": 120.0, "event": "global_model", "round": 1},
        {"ts": 124.0, "event": "global_model", "round": 2},
        {"ts": 128.0, "event": "global_model", "round": 3},
    ])
    _write(tmp_path / "events" / "site-a.jsonl", [
        {"ts": 119.0, "event": "round_end", "round": 0, "steps": 5, "tokens": 1000, "train_seconds": 3.0, "wall_seconds": 3.5},
        {"ts": 123.0, "event": "round_end", "round": 1, "steps": 5, "tokens": 1000, "train_seconds": 3.0, "wall_seconds": 3.25},
        {"ts": 127.0, "event": "round_end", "round": 2, "steps": 5, "tokens": 1000, "train_seconds": 3.0, "wall_seconds": 3.25},
    ])
    t = site_timings(tmp_path, "a", job_seconds=40.0)
    assert t["round_seconds"] == [20.0, 4.0, 4.0]
    assert t["round_overhead_s"] == pytest.approx(1.0)  # 4 s round - 3 s training
    assert t["fit_setup_s"] == pytest.approx(0.25)
    assert t["outside_fit_s"] == pytest.approx(0.75)
    assert t["fixed_cost_s"] == pytest.approx(40.0 - 3 * 4.0)
    assert t["tokens_per_s"] == pytest.approx(3000 / 9.0) and t["steps"] == 15


def test_b1_refuses_a_run_whose_site_missed_a_round(tmp_path):
    _write(tmp_path / "events" / "server.jsonl", [
        {"ts": 1.0, "event": "job_start"}, *[{"ts": 1.0 + r, "event": "global_model", "round": r} for r in (1, 2, 3)],
    ])
    _write(tmp_path / "events" / "site-a.jsonl", [
        {"ts": 1.5, "event": "round_end", "round": 0, "steps": 1, "tokens": 1, "train_seconds": 0.1, "wall_seconds": 0.1},
    ])
    with pytest.raises(RuntimeError, match="site a ended rounds"):
        site_timings(tmp_path, "a", job_seconds=10.0)


def test_b2_sizes_are_those_of_the_quantized_tensors():
    torch.manual_seed(0)
    weights = {"w": torch.randn(512, 256), "b": torch.randn(256)}
    sizes = message_sizes(weights)
    assert sizes["fp32"] == (512 * 256 + 256) * 4
    assert sizes["fp16"] == sizes["fp32"] // 2
    # one byte per weight + one fp32 scale per 4096-weight block + the 256-entry code book, per tensor
    assert sizes["blockwise8"] == 512 * 256 + 32 * 4 + 256 * 4 + 256 + 1 * 4 + 256 * 4
    assert sizes["normfloat4"] < sizes["blockwise8"] < sizes["fp16"]


def test_the_table_shows_every_headline_number():
    setup = {"model": "tiny", "max_seq_length": 128, "micro_batch_size": 8, "repeats": 3}
    result = {
        "b1": {"setup": setup, **{m: {"ratio": 0.95, "round_overhead_s": 0.5, "fixed_cost_s": 20.0, "rounds": 5,
                                      "steps_per_round": 5} for m in ("lora", "sft")}},
        "b2": {"headline_model": "tiny", "lora_over_sft": 0.004, "prompt_tuning_over_sft": 0.0001, "q8_over_fp32": 0.25,
               "models": {"tiny": {"parameters": 1e6, "methods": {"sft": {"over_fp32_full": {
                   "fp16": 0.5, "blockwise8": 0.25, "float4": 0.13, "normfloat4": 0.13}}}}}},
        "b3": {"peak_rss_over_model": {"106M/2": 3.0, "106M/16": 3.1, "411M/8": 3.2}, "setup_line": "x"},
        "b4": {"setup": {**setup, "method": "sft", "steps": 30}, "fedllm_over_plain": 0.97, "best_variant": "fedllm+packing",
               "speedup_over_plain": 1.4},
        "b5": {"error": "never"},
    }
    rows = summary_rows(result)
    measures = [r[1] for r in rows]
    assert "lora: site tok/s / plain loop" in measures and "sft: overhead per round (s)" in measures
    assert "LoRA bytes / SFT bytes" in measures and "SFT blockwise8 / fp32" in measures
    assert [r[2] for r in rows if r[0] == "B3"] == ["3.00", "3.10", "3.20"]
    assert [r[1] for r in rows if r[0] == "B3"][-1] == "server peak RSS / model, 411M, 8 sites"
    assert any(r[1].startswith("best (fedllm+packing)") and r[2] == "1.400" for r in rows)


def test_the_table_shows_the_smollm2_rows():
    setup = {"model": "SmolLM2-135M-Instruct (llama, 134.5M params)", "max_seq_length": 64, "micro_batch_size": 8,
             "repeats": 1, "precision": "bf16-mixed", "effective_precision": "bf16-mixed", "threads": 2}
    result = {
        "b1_smollm2": {"setup": setup, **{m: {"ratio": 1.05, "round_overhead_s": 0.4, "fixed_cost_s": 40.0, "rounds": 3,
                                              "steps_per_round": 3} for m in ("lora", "sft")}},
        "b4_smollm2": {"setup": {**setup, "method": "lora", "steps": 10}, "fedllm_over_plain": 1.1,
                       "tokens_per_s": {"plain": 100.0, "fedllm": 110.0, "fedllm+packing": 150.0}},
        "b4_smollm2_sft": {"setup": {**setup, "method": "sft", "steps": 10}, "fedllm_over_plain": 0.9,
                           "tokens_per_s": {"plain": 100.0, "fedllm": 90.0, "fedllm+packing": 160.0}},
    }
    rows = {r[1]: r for r in summary_rows(result)}
    for method in ("lora", "sft"):
        assert rows[f"{method} (SmolLM2-135M): site tok/s / plain loop"][2] == "1.050"
        assert rows[f"{method} (SmolLM2-135M): overhead per round (s)"][2] == "0.40"
    assert "bf16-mixed" in rows["lora (SmolLM2-135M): site tok/s / plain loop"][4]
    assert rows["fedllm site / plain loop (SmolLM2-135M, lora)"][2] == "1.100"
    assert rows["  fedllm+packing / plain loop (SmolLM2-135M, lora)"][2] == "1.500"
    assert rows["fedllm site / plain loop (SmolLM2-135M, sft)"][2] == "0.900"
    assert rows["  fedllm+packing / plain loop (SmolLM2-135M, sft)"][2] == "1.600"
    assert not any(r[1].startswith("lora: ") for r in rows.values())  # no tiny rows without a b1 result


def test_e2_keeps_the_other_alphas_already_measured(tmp_path):
    from bench.e2_phrasebank import earlier_runs

    path = tmp_path / "e2.json"
    assert earlier_runs(path, [], False, exclude=[10.0]) == []
    path.write_text(json.dumps({"overrides": ["baselines.centralized=false"], "quick": False,
                                "runs": [{"alpha": 1.0}, {"alpha": 5.0}, {"alpha": 10.0}]}))
    assert earlier_runs(path, ["baselines.centralized=false"], False, exclude=[10.0]) == [{"alpha": 1.0}, {"alpha": 5.0}]
    # other overrides or a smoke run measure something else: nothing is kept
    assert earlier_runs(path, [], False, exclude=[10.0]) == []
    assert earlier_runs(path, ["baselines.centralized=false"], True, exclude=[10.0]) == []
