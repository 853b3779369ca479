"""A run's checkpoints and artifacts in a real S3 server, as a user drives it through the CLI.

- ``fedllm run CONFIG --store s3://...`` leaves every artifact of the run in the bucket, each
  folder with a manifest; a reader with only the ``minio`` client loads the final model;
- no S3 key ever appears in the run dir or the CLI's output;
- ``fedllm bundle`` puts a model, data and eval task data in S3, and a run whose model,
  training data and eval task data are s3:// URIs (an air-gapped site) uses them;
- the S3 server dying under ``fedllm bundle``: retries, one clear error, no partial object;
  once it is back the same command completes.
"""

from __future__ import annotations

import hashlib
import json
import os

from cli_runs import fedllm, tiny_config
from s3server import BUCKET, read_object, s3_server, start_s3_server  # noqa: F401 (s3_server is a fixture)

from conftest import SHARED_DATA as DATA_DIR  # the checkout's ../shared/data


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_run_leaves_every_artifact_in_s3_and_no_secret_anywhere(tmp_path, monkeypatch):
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        run = tmp_path / "run"
        config = tiny_config(tmp_path, rounds=2)
        done = fedllm("run", str(config), "--out", str(run), "--store", f"s3://{BUCKET}/runs/a", "--no-progress")
        client = server.client()
        stored = {o.object_name[len("runs/a/"):] for o in client.list_objects(BUCKET, prefix="runs/a/", recursive=True)}

        # Every file the run wrote (but NVFlare's scratch workspace) is in the bucket, under a
        # folder whose manifest lists it with its sha256.
        local = {p.relative_to(run).as_posix() for p in run.rglob("*") if p.is_file()}
        local = {k for k in local if not k.startswith("federation/workspace/") and k != "federation/best.json"}
        assert local - stored == set(), f"not published: {sorted(local - stored)[:10]}"
        manifests = {k.rpartition("/")[0]: json.loads(read_object(client, f"runs/a/{k}"))
                     for k in stored if k.endswith("MANIFEST.json")}
        for key in sorted(k for k in local if not k.endswith("MANIFEST.json")):
            folder = max((m for m in manifests if key.startswith(m + "/") or m == ""), key=len)
            entry = manifests[folder]["files"][key[len(folder) + 1:] if folder else key]
            if not key.startswith("events/"):  # the event logs grow after each publish
                assert entry["sha256"] == sha256((run / key).read_bytes()), key
        config_hash = manifests["models/fedavg"]["meta"]["config_hash"]
        for r in (1, 2):
            meta = manifests[f"federation/rounds/round-{r:03d}"]["meta"]
            assert meta["round"] == r and meta["config_hash"] == config_hash
        assert manifests["federation/best"]["meta"]["round"] in (1, 2)
        assert {"config.yaml", "model.json", "summary.json"} <= set(manifests[""]["files"])
        assert {"report/index.html", "report/report.md", "summary.json", "settings/fedavg.json",
                "models/site-dolly/model.safetensors", "models/centralized/model.safetensors",
                "data/partition.json"} <= stored

        # A second reader with nothing but the minio client loads the final global model.
        reader = tmp_path / "reader"
        for name in manifests["models/fedavg"]["files"]:
            (reader / name).parent.mkdir(parents=True, exist_ok=True)
            (reader / name).write_bytes(read_object(client, f"runs/a/models/fedavg/{name}"))
        import torch
        from safetensors.torch import load_file
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(reader)
        written = load_file(str(run / "models" / "fedavg" / "model.safetensors"))
        for name, tensor in model.state_dict().items():
            if name in written:
                assert torch.equal(tensor, written[name]), name

        # No key in any file of the run dir, nor in what the CLI printed.
        for secret in (server.secret_key, server.access_key):
            assert secret not in done.stdout + done.stderr
            for path in run.rglob("*"):
                if path.is_file():
                    assert secret.encode() not in path.read_bytes(), path
    finally:
        server.kill()


def test_air_gapped_site_reads_model_data_and_eval_tasks_from_s3(tmp_path, monkeypatch):
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        # What an operator does once, on a machine with the assets: bundle them into S3.
        first = tmp_path / "first"
        fedllm("partition", str(tiny_config(tmp_path)), "--out", str(first))
        fedllm("bundle", str(first / "models" / "base"), f"s3://{BUCKET}/models/tiny", "--meta", "source=tiny")
        fedllm("bundle", str(DATA_DIR / "oasst1" / "en-validation.jsonl"), f"s3://{BUCKET}/data/oasst1")
        fedllm("bundle", str(DATA_DIR / "piqa"), f"s3://{BUCKET}/tasks/piqa")
        manifest = json.loads(read_object(server.client(), "models/tiny/MANIFEST.json"))
        assert manifest["meta"]["source"] == "tiny" and "model.safetensors" in manifest["files"]

        # The site: model, training data and eval task data only as s3:// URIs.
        site = tmp_path / "site"
        site.mkdir()
        config = tiny_config(
            site,
            model={"source": f"s3://{BUCKET}/models/tiny"},
            data={"sources": [{"name": "oasst1", "format": "oasst1", "path": f"s3://{BUCKET}/data/oasst1/en-validation.jsonl",
                               "max_records": 60}]},
            evaluation={"task_data_dir": f"s3://{BUCKET}/tasks", "tasks": ["piqa"], "limit": 4},
        )
        run = site / "run"
        fedllm("partition", str(config), "--out", str(run))
        assert sha256((run / "models" / "base" / "model.safetensors").read_bytes()) == \
            manifest["files"]["model.safetensors"]["sha256"]
        assert len((run / "data" / "sites" / "oasst1" / "train.jsonl").read_text().splitlines()) == 48

        from fedllm.run import evaluate_setting, score_base

        score_base(run)
        result = evaluate_setting(run, "base")
        assert result["tasks"] and 0.0 <= result["metrics"]["mean"]["value"] <= 1.0
    finally:
        server.kill()


def test_bundle_when_the_s3_server_dies_then_returns(tmp_path, monkeypatch):
    server = start_s3_server("rclone", tmp_path, monkeypatch)
    try:
        model = tmp_path / "model"
        model.mkdir()
        (model / "model.safetensors").write_bytes(os.urandom(1 << 20))
        (model / "config.json").write_text("{}")
        uri = f"s3://{BUCKET}/models/m"
        server.kill()
        failed = fedllm("bundle", str(model), uri, check=False, env_extra={"FEDLLM_S3_RETRIES": "3"})
        assert failed.returncode == 2
        error = failed.stderr.strip().splitlines()[-1]
        assert error.startswith("error: S3 ") and "failed after 3 tries" in error and "s3://fedllm-test/models/m" in error
        assert server.secret_key not in failed.stderr and server.access_key not in failed.stderr

        server.start()
        assert not any(server.client().list_objects(BUCKET, prefix="models/", recursive=True)) if \
            server.client().bucket_exists(BUCKET) else True
        fedllm("bundle", str(model), uri)
        stored = read_object(server.client(), "models/m/model.safetensors")
        assert stored == (model / "model.safetensors").read_bytes()
        assert "MANIFEST.json" in {o.object_name.rpartition("/")[2] for o in server.client().list_objects(BUCKET, prefix="models/m/")}
    finally:
        server.kill()
