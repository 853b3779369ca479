"""B3 — the FedAvg server's peak memory with a >=100M-parameter model, 2 -> 16 sites.

Runs real NVFlare 2.9 federations in POC mode (``PocEnv``: the server, its job process and
every site are separate processes, as in production) in a temporary POC workspace. The model
is ``torch.nn.Transformer`` at GPT-2-base widths (d_model 768, 12 heads, FFN 3072; 7 encoder
+ 6 decoder layers = 106.3M parameters, 425 MB in fp32), full-model SFT weights (no PEFT).
Each site only adds small noise to the weights it receives (``bench/common.py --noise``), so
the run measures aggregation, not training.

While the job runs, a sampler reads every 50 ms the RSS of each server process separately:
the server parent (``server_train``) and the job process it spawns (``runner_process``), where
FedAvg aggregates. Peak RSS / model size is reported per process, twice: as measured, and
net of the process itself: minus the peak of the same job process in the same federation
with a 72-parameter model (its interpreter, NVFlare, torch and threads: ~0.5 GB, more than
the model's size on its own). The net figure is the memory aggregation costs.

Variants:

* ``nvflare-defaults``: the recipe as NVFlare builds it (numpy exchange, InTime aggregation);
* ``nvflare-offload``: NVFlare's recipe with PyTorch exchange and tensor disk offload;
* ``fedllm``: what ``fedllm/federation/job.py`` ships: ``RoundCheckpointPersistor`` (round 0
  read from a file; it also bounds what is in flight to and from the sites:
  ``fedllm.federation.sending``), ``SiteTolerantFedAvg`` sending the global model itself,
  ``RunningWeightedAverage`` writing the mean into it, ``tuning.server_memory_settings()``
  (PyTorch exchange, tensor disk offload), ``apply_memory_settings``;
* ``fedllm-bf16``: the same with bf16 exchange.

    .venv/bin/python bench/b3_server_memory.py --sites 2 4 8 16 --large-sites 2 4 --rounds 3
    .venv/bin/python bench/b3_server_memory.py --variants nvflare-defaults nvflare-offload --sites 2 8 \
        --large-sites --merge       # NVFlare's variants beside the fedllm runs already in b3.json
    .venv/bin/python bench/b3_server_memory.py --quick     # 2 sites, a 4x smaller model

Prints a Markdown table and writes ``bench/results/b3.json``; ``peak_rss_over_model`` is the
server job process's peak for the shipped variant, per number of sites.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.common import print_table, write_result  # noqa: E402

MODEL = {
    "class_path": "torch.nn.Transformer",
    "args": {
        "d_model": 768,
        "nhead": 12,
        "num_encoder_layers": 7,
        "num_decoder_layers": 6,
        "dim_feedforward": 3072,
    },
}
# The same federation with next to no model: what the server job process holds without one.
BASELINE_MODEL = {"class_path": "torch.nn.Linear", "args": {"in_features": 8, "out_features": 8}}
# >= 400M parameters: d_model 1024, 16 heads, FFN 4096, 14 + 14 layers (412M, 1.65 GB fp32)
LARGE_MODEL = {
    "class_path": "torch.nn.Transformer",
    "args": {"d_model": 1024, "nhead": 16, "num_encoder_layers": 14, "num_decoder_layers": 14, "dim_feedforward": 4096},
}
QUICK_MODEL_ARGS = {"d_model": 512, "nhead": 8, "num_encoder_layers": 3, "num_decoder_layers": 3, "dim_feedforward": 2048}
VARIANTS = ("nvflare-defaults", "nvflare-offload", "fedllm", "fedllm-bf16")
SAMPLE_EVERY_S = 0.05


def model_size_bytes(model: dict = MODEL) -> tuple[int, int]:
    """(parameter count, fp32 bytes) of ``model``'s state dict, computed from the real module."""
    import importlib

    module_name, class_name = model["class_path"].rsplit(".", 1)
    module = getattr(importlib.import_module(module_name), class_name)(**model["args"])
    count = sum(t.numel() for t in module.state_dict().values())
    nbytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    return count, nbytes


class ServerMemorySampler(threading.Thread):
    """Samples, every 50 ms, the RSS of each server process of the POC federation in ``root``.

    Processes are recognised by their command line (NVFlare module names) and by the POC
    workspace path in it; each process's peak is kept separately, by role and pid.
    """

    ROLES = {
        "server_train": "server parent",
        "runner_process": "server job",
    }

    def __init__(self, root: str):
        super().__init__(daemon=True)
        self.root = root
        self.peaks: dict[int, dict] = {}
        self._done = threading.Event()

    def run(self) -> None:
        import psutil

        while not self._done.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                cmdline = " ".join(proc.info["cmdline"] or [])
                if self.root not in cmdline or "server" not in cmdline:
                    continue
                role = next((r for key, r in self.ROLES.items() if key in cmdline), None)
                if role is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                entry = self.peaks.setdefault(proc.pid, {"role": role, "peak_rss": 0, "first_rss": rss, "samples": 0})
                entry["peak_rss"] = max(entry["peak_rss"], rss)
                entry["samples"] += 1
            self._done.wait(SAMPLE_EVERY_S)

    def stop(self) -> None:
        self._done.set()
        self.join()


def build_recipe(variant: str, model: dict, sites: int, rounds: int, noise: float, workdir: Path):
    """The benchmark's FedAvg recipe with ``variant``'s memory settings."""
    from nvflare.app_opt.pt.recipes.fedavg import FedAvgRecipe
    from nvflare.client.config import ExchangeFormat

    from fedllm.federation.aggregation import RunningWeightedAverage
    from fedllm.federation.tuning import apply_memory_settings, apply_round_tuning, server_memory_settings

    common = dict(
        name=f"b3-{variant}-{sites}",
        min_clients=sites,
        num_rounds=rounds,
        train_script="bench/common.py",
        train_args=f"--train-ms 0 --noise {noise} --times-dir {workdir / 'site_times'}",
    )
    if variant.startswith("fedllm"):
        # What fedllm/federation/job.py builds: its persistor reading round 0 from a file, its
        # controller sending the global model itself and its aggregator writing the mean into it.
        from fedllm.federation.job import ResumableFedAvgRecipe
        from fedllm.federation.persistor import RoundCheckpointPersistor

        dtype = "bfloat16" if variant == "fedllm-bf16" else "float32"
        initial = write_initial_weights(model, workdir / "initial.safetensors", dtype)
        persistor = RoundCheckpointPersistor(initial_weights=str(initial), checkpoint_dir=str(workdir / "rounds"),
                                             events_file=str(workdir / "server_events.jsonl"))
        recipe = ResumableFedAvgRecipe(
            participation={"share_global_model": True, "events_file": str(workdir / "server_events.jsonl")},
            model_persistor=persistor,
            aggregator=RunningWeightedAverage(),
            **server_memory_settings(),
            **common,
        )
        apply_round_tuning(recipe)
        apply_memory_settings(recipe)
        return recipe
    kwargs = {}
    if variant == "nvflare-offload":
        kwargs = {"server_expected_format": ExchangeFormat.PYTORCH, "enable_tensor_disk_offload": True}
    recipe = FedAvgRecipe(model=model, **kwargs, **common)
    apply_round_tuning(recipe)  # the same polling for all, so only memory differs
    return recipe


def write_initial_weights(model: dict, path: Path, dtype: str) -> Path:
    """``model``'s state dict as the round-0 file fedllm's server reads (``fedllm prepare``
    writes it for a real run), in ``dtype``."""
    import importlib

    import torch
    from safetensors.torch import save_file

    module_name, class_name = model["class_path"].rsplit(".", 1)
    torch.manual_seed(0)
    module = getattr(importlib.import_module(module_name), class_name)(**model["args"])
    weights = {name: value.to(getattr(torch, dtype)).contiguous() for name, value in module.state_dict().items()}
    del module
    save_file(weights, str(path))
    return path


def server_round_peaks(workdir: Path) -> list[int]:
    """The per-round peaks fedllm's persistor recorded (``server_peak_rss`` of its
    ``global_model`` events), round by round."""
    import json

    path = workdir / "server_events.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row["server_peak_rss"] for row in rows if row.get("event") == "global_model" and "server_peak_rss" in row]


def run_federation(variant: str, sites: int, rounds: int, noise: float, workdir: Path, model: dict = MODEL) -> dict:
    from nvflare.recipe.poc_env import PocEnv

    os.environ["NVFLARE_POC_WORKSPACE"] = str(workdir / "poc")
    recipe = build_recipe(variant, model, sites, rounds, noise, workdir)
    env = PocEnv(num_clients=sites)
    sampler = ServerMemorySampler(str(workdir / "poc"))
    sampler.start()
    started = time.monotonic()
    try:
        run = _submit(recipe, env)
        status = run.get_result(timeout=1800)
        status_text = run.get_status()
    finally:
        wall_s = time.monotonic() - started
        try:
            sampler.stop()
        finally:
            try:
                env.stop(clean_up=True)  # never leave POC services running
            finally:
                _kill_leftovers(str(workdir / "poc"))
    return {"wall_s": wall_s, "job_status": str(status_text), "result": str(status), "processes": sampler.peaks,
            "round_peaks_recorded": server_round_peaks(workdir)}


def _baseline_peak(sites: int, rounds: int) -> int:
    """Peak RSS of the server job process in the shipped federation of ``sites`` with a
    72-parameter model: the process's own footprint. 0 when the run failed."""
    workdir = Path(tempfile.mkdtemp(prefix=f"b3-baseline-{sites}-"))
    try:
        result = run_federation("fedllm", sites, rounds, 0.0, workdir, BASELINE_MODEL)
    except Exception as error:
        print(f"[b3] baseline sites={sites} failed: {type(error).__name__}: {error}", flush=True)
        return 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    peak = max((e["peak_rss"] for e in result["processes"].values() if e["role"] == "server job"), default=0)
    print(f"[b3] baseline sites={sites}: server job process without a model peaks at {peak / 2**20:.0f} MiB", flush=True)
    return peak


def _kill_leftovers(root: str) -> None:
    """End this benchmark's POC processes that ``env.stop`` missed (it cannot reach a server
    that never came up, and that server's sites keep retrying); only processes whose command
    line names this run's own POC workspace."""
    from fedllm.federation.federate import stop_processes_mentioning

    stop_processes_mentioning(root)


def _submit(recipe, env, attempts: int = 3):
    """``recipe.run(env)``, retried when the fresh POC server is not up yet.

    PocEnv waits a fixed 3 s after starting the services and then gives the admin session
    10 s to connect; on a loaded machine the server can take longer to listen.
    """
    for attempt in range(1, attempts + 1):
        try:
            return recipe.run(env)
        except Exception as error:  # FLCommunicationError is wrapped by the session manager
            if "connect" not in repr(error) and "connect" not in repr(error.__cause__) or attempt == attempts:
                raise
            print(f"[b3] POC server not reachable yet (attempt {attempt}): {error}; restarting POC", flush=True)
            env.stop(clean_up=True)
            _kill_leftovers(os.environ["NVFLARE_POC_WORKSPACE"])
            time.sleep(5)


def measure(model: dict, label: str, sites_list: list[int], variants: list[str], rounds: int, noise: float,
            baselines: dict) -> tuple[list[list], list[dict]]:
    """Run ``variants`` at each number of sites with ``model``; table rows and run records."""
    params, nbytes = model_size_bytes(model)
    rows, runs = [], []
    for sites in sites_list:
        if str(sites) not in baselines:
            baselines[str(sites)] = _baseline_peak(sites, rounds)
        for variant in variants:
            workdir = Path(tempfile.mkdtemp(prefix=f"b3-{variant}-{sites}-"))
            try:
                result = run_federation(variant, sites, rounds, noise, workdir, model)
            except Exception as error:  # e.g. the POC server never came up: record it, measure the rest
                print(f"[b3] {label} {variant} sites={sites} failed: {type(error).__name__}: {error}", flush=True)
                runs.append({"model": label, "variant": variant, "sites": sites, "error": f"{type(error).__name__}: {error}"})
                continue
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
            by_role = {}
            for pid, entry in result["processes"].items():
                by_role[entry["role"]] = max(by_role.get(entry["role"], 0), entry["peak_rss"])
            job_peak, parent_peak = by_role.get("server job", 0), by_role.get("server parent", 0)
            baseline = baselines[str(sites)]
            net = (job_peak - baseline) / nbytes if baseline else None
            run = {"model": label, "parameters": params, "bytes_fp32": nbytes, "variant": variant, "sites": sites,
                   "rounds": rounds, **result, "peak_rss_by_role": by_role,
                   "peak_rss_over_model": job_peak / nbytes, "net_over_model": net}
            runs.append(run)
            recorded = result["round_peaks_recorded"]
            rows.append([label, variant, sites, job_peak / 2**20, job_peak / nbytes, net if net is not None else "n/a",
                         " / ".join(f"{p / nbytes:.2f}" for p in recorded) or "-", parent_peak / nbytes, result["wall_s"]])
            print(f"[b3] {label} {variant} sites={sites}: server job peak {job_peak / nbytes:.2f}x model "
                  f"({net if net is not None else float('nan'):.2f}x net of the process), "
                  f"per round as recorded {[round(p / nbytes, 2) for p in recorded]}, parent {parent_peak / nbytes:.2f}x, "
                  f"wall {result['wall_s']:.0f} s, status {result['job_status']}", flush=True)
    return rows, runs


def merge_earlier(path: str, runs: list[dict], baselines: dict) -> tuple[list[dict], dict, dict | None]:
    """``runs`` plus the runs of the earlier result at ``path`` that they do not repeat (same
    variant, model and sites), with the earlier baselines for the numbers of sites not
    measured now, and the earlier large model's description (None where it had none)."""
    import json

    earlier = json.loads(Path(path).read_text())
    repeated = {(r["variant"], r["model"], r["sites"]) for r in runs}
    kept = [{**r, "measured_at": r.get("measured_at") or "an earlier run (no date recorded)"}
            for r in earlier.get("runs", []) if (r["variant"], r["model"], r["sites"]) not in repeated]
    merged_baselines = dict(earlier.get("baseline_peak_rss_bytes", {}))  # keys: str(sites), as measure() keeps them
    merged_baselines.update(baselines)
    print(f"[b3] kept {len(kept)} runs of {path}", flush=True)
    return kept + runs, merged_baselines, earlier.get("large_model")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sites", type=int, nargs="*", default=[2, 4, 8, 16], help="sites for the 106M model (none: only --large-sites)")
    parser.add_argument("--large-sites", type=int, nargs="*", default=[2, 4, 8], help="sites for the 412M model")
    parser.add_argument("--nvflare-sites", type=int, nargs="*", default=[2, 4, 8],
                        help="sites at which NVFlare's own variants run (106M model only: at 16 sites or 412M "
                             "they would not fit this machine's memory beside the sites)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1e-3)
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, help="default: all")
    parser.add_argument("--quick", action="store_true", help="2 sites, a 4x smaller model, fedllm only")
    parser.add_argument("--merge", nargs="?", const=str(REPO / "bench" / "results" / "b3.json"), metavar="JSON",
                        help="keep the runs of an earlier result (default: bench/results/b3.json) that this one "
                             "does not repeat (same variant, model and sites), each with its measured_at")
    args = parser.parse_args(argv)
    model, large = MODEL, LARGE_MODEL
    if args.quick:
        args.sites, args.large_sites, args.variants = [2], [], args.variants or ["fedllm"]
        model = {**MODEL, "args": QUICK_MODEL_ARGS}
    args.variants = args.variants or list(VARIANTS)
    os.chdir(REPO)  # train_script is relative to the repo root

    params, nbytes = model_size_bytes(model)
    label = f"{params / 1e6:.0f}M"
    baselines: dict = {}
    rows, runs = [], []
    for sites in args.sites:
        variants = [v for v in args.variants if v.startswith("fedllm") or sites in args.nvflare_sites]
        more_rows, more_runs = measure(model, label, [sites], variants, args.rounds, args.noise, baselines)
        rows += more_rows
        runs += more_runs
    if args.large_sites:
        large_params, large_bytes = model_size_bytes(large)
        more_rows, more_runs = measure(large, f"{large_params / 1e6:.0f}M", args.large_sites, ["fedllm"],
                                       args.rounds, args.noise, baselines)
        rows += more_rows
        runs += more_runs

    print(f"models: torch.nn.Transformer {label} ({nbytes / 2**20:.0f} MiB fp32)"
          + (f", {large_params / 1e6:.0f}M ({large_bytes / 2**20:.0f} MiB fp32)" if args.large_sites else "")
          + f"; server job process without a model: {', '.join(f'{k} sites {v / 2**20:.0f} MiB' for k, v in baselines.items())}")
    print_table(
        ["model", "variant", "sites", "server job peak RSS (MiB)", "x model (fp32)", "x model, net of the process",
         "per round, recorded by fedllm", "server parent x model", "wall (s)"],
        rows,
    )
    measured_at = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for run in runs:
        run["measured_at"] = measured_at
    if args.merge:
        runs, baselines, large_info = merge_earlier(args.merge, runs, baselines)
        if large_info and not args.large_sites:
            large, large_params, large_bytes = large_info, large_info["parameters"], large_info["bytes_fp32"]
            args.large_sites = sorted({r["sites"] for r in runs if r["model"] == f"{large_params / 1e6:.0f}M"})
        args.variants = sorted({r["variant"] for r in runs})
    ok = [r for r in runs if "error" not in r]
    shipped = [r for r in ok if r["variant"] == "fedllm"]
    payload = {
        "benchmark": "b3",
        "model": {**model, "parameters": params, "bytes_fp32": nbytes},
        "large_model": {**large, "parameters": large_params, "bytes_fp32": large_bytes} if args.large_sites else None,
        "setup": {"rounds": args.rounds, "noise": args.noise, "mode": "POC (PocEnv)", "sample_every_s": SAMPLE_EVERY_S},
        "setup_line": f"torch.nn.Transformer {label}"
                      + (f" and {large_params / 1e6:.0f}M" if args.large_sites else "")
                      + f" params, full SFT weights, POC, {args.rounds} rounds",
        # the shipped variant, per model and number of sites
        "peak_rss_over_model": {f"{r['model']}/{r['sites']}": r["peak_rss_over_model"] for r in shipped},
        "net_peak_rss_over_model": {f"{r['model']}/{r['sites']}": r["net_over_model"] for r in shipped},
        "baseline_peak_rss_bytes": baselines,
        "by_variant": {v: {f"{r['model']}/{r['sites']}": r["peak_rss_over_model"] for r in ok if r["variant"] == v}
                       for v in args.variants},
        "net_by_variant": {v: {f"{r['model']}/{r['sites']}": r["net_over_model"] for r in ok if r["variant"] == v}
                           for v in args.variants},
        "runs": runs,
    }
    path = write_result("b3", payload)
    print(f"[b3] wrote {path}")
    return payload


if __name__ == "__main__":
    from bench.run_all import exit_now

    main()
    exit_now(0)
