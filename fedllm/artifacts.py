"""A run's artifacts in its store, and the round checkpoints a federation resumes from.

A run dir is mirrored into its store (``--store URI``, or ``$FEDLLM_STORE``) under the same
relative names, each folder with a ``MANIFEST.json`` (files, sizes, sha256, the config hash)
written last, so a reader knows a folder is complete and intact:

    MANIFEST.json                  config.yaml, model.json, summary.json (what is there yet)
    data/                          partitions and the partition summary
    models/base/ models/<setting>/ the base model and every setting's exported model
    settings/ evals/ events/       per-setting results, lm-eval results, event logs
    report/                        index.html, report.md, figures
    federation/rounds/round-XXX/   every round's global model (written by the server)
    federation/best/               the global model with the lowest validation loss

A round checkpoint is the folder ``round-XXX`` holding ``exchanged.safetensors``,
``meta.json`` and a ``MANIFEST.json`` — the same layout in the run dir and in the store.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from fedllm.errors import FedllmError
from fedllm.files import write_json_atomic
from fedllm.rundir import BEST, ROUNDS, TOP_FILES, RunDir, round_key, round_name, round_number_of
from fedllm.store import MANIFEST_NAME, ObjectNotFound, open_store, redact
from fedllm.store.manifest import build_manifest, encode_manifest, local_files, parse_manifest, sha256_of_file

STORE_ENV = "FEDLLM_STORE"


def store_uri_of(store: Optional[str]) -> Optional[str]:
    """The store a run publishes to: ``store`` if given, else ``$FEDLLM_STORE``, else None."""
    return store or os.environ.get(STORE_ENV) or None


# -- manifests of local folders ---------------------------------------------------------


def write_local_manifest(folder: Path, meta: dict) -> dict:
    """Write ``folder/MANIFEST.json`` for the files in ``folder`` (the store's format)."""
    entries = {rel: {"size": p.stat().st_size, "sha256": sha256_of_file(p)} for p, rel in local_files(folder)}
    manifest = build_manifest(entries, meta)
    (folder / MANIFEST_NAME).write_bytes(encode_manifest(manifest))
    return manifest


def verify_local_dir(folder: Path) -> dict:
    """The manifest of ``folder`` after checking every file it lists for size and sha256.

    FedllmError "<folder>: file <name>: corrupted: ..." on the first mismatch, or when there
    is no manifest (the folder was not written completely).
    """
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise FedllmError(f"{folder}: no {MANIFEST_NAME}; the checkpoint was not written completely")
    manifest = parse_manifest(path.read_bytes(), str(path))
    for rel, entry in manifest["files"].items():
        file = folder / rel
        if not file.is_file():
            raise FedllmError(f"{folder}: file {rel}: missing; the manifest lists it")
        size = file.stat().st_size
        if size != entry["size"] or sha256_of_file(file) != entry["sha256"]:
            raise FedllmError(
                f"{folder}: file {rel}: corrupted: sha256 mismatch with {MANIFEST_NAME} "
                f"({size} bytes, manifest {entry['size']})"
            )
    return manifest


# -- round checkpoints --------------------------------------------------------------------


def persisted_rounds(checkpoint_dir: Path, store: Optional[str], config_hash: str) -> list[int]:
    """Rounds whose global model is complete (manifest present, written for this config),
    in the store when one is given, else in ``checkpoint_dir``; ascending."""
    found = []
    if store:
        s = open_store(store)
        for key in s.list(ROUNDS + "/"):
            name, _, last = key[len(ROUNDS) + 1:].partition("/")
            number = round_number_of(name)
            if last == MANIFEST_NAME and number is not None:
                if s.read_manifest(round_key(number))["meta"].get("config_hash") == config_hash:
                    found.append(number)
        return sorted(found)
    for folder in Path(checkpoint_dir).iterdir() if Path(checkpoint_dir).is_dir() else []:
        manifest = folder / MANIFEST_NAME
        number = round_number_of(folder.name)
        if number is not None and folder.name == round_name(number) and manifest.is_file():
            meta = parse_manifest(manifest.read_bytes(), str(manifest))["meta"]
            if meta.get("config_hash") == config_hash:
                found.append(number)
    return sorted(found)


def fetch_round(checkpoint_dir: Path, store: Optional[str], round_number: int) -> Path:
    """The local folder of round ``round_number``, downloaded from the store if given (each
    file checked against the stored manifest), then verified against its manifest."""
    folder = Path(checkpoint_dir) / round_name(round_number)
    if store:
        s = open_store(store)
        key = round_key(round_number)
        partial = folder.with_name(folder.name + ".fetch")
        shutil.rmtree(partial, ignore_errors=True)
        s.get_dir(key, partial)
        partial.joinpath(MANIFEST_NAME).write_bytes(s.get_bytes(f"{key}/{MANIFEST_NAME}"))
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(partial, folder)
    verify_local_dir(folder)
    return folder


def clear_rounds(store: Optional[str]) -> None:
    """Remove a previous federation's rounds and best model from the store (a fresh start)."""
    if not store:
        return
    s = open_store(store)
    for key in s.list(ROUNDS + "/") + s.list(BEST + "/"):
        s.delete(key)


def best_of(store: Optional[str], checkpoint_dir: Path) -> Optional[dict]:
    """``{"round", "val_loss"}`` of the best global model so far, or None."""
    if store:
        try:
            meta = open_store(store).read_manifest(BEST)["meta"]
        except ObjectNotFound:
            return None
        return {"round": meta["round"], "val_loss": meta["val_loss"]}
    path = _best_record(checkpoint_dir)
    return json.loads(path.read_text()) if path.is_file() else None


def record_best(store: Optional[str], checkpoint_dir: Path, round_number: int, val_loss: float, config_hash: str) -> bool:
    """Make round ``round_number`` the best global model if ``val_loss`` beats the recorded
    one (kept across a resume); return whether it did."""
    best = best_of(store, checkpoint_dir)
    if best is not None and best["val_loss"] <= val_loss:
        return False
    record = {"round": round_number, "val_loss": val_loss, "config_hash": config_hash}
    folder = Path(checkpoint_dir) / round_name(round_number)
    if store:
        open_store(store).put_dir(folder, BEST, meta=record)
    write_json_atomic(_best_record(checkpoint_dir), record)
    return True


def _best_record(checkpoint_dir: Path) -> Path:
    """federation/best.json of the run whose rounds are in ``checkpoint_dir``."""
    return RunDir(Path(checkpoint_dir).parents[1]).best_record


# -- publishing a run's artifacts ---------------------------------------------------------

def publish(run_dir: str | os.PathLike, store: Optional[str], what: str) -> list[str]:
    """Upload what step ``what`` left in ``run_dir`` to ``store`` (see the module docstring),
    each folder with a manifest carrying the config hash; return the keys of the folders
    written. No store: nothing to do. Errors name the store URI with no key in it."""
    if not store:
        return []
    layout = RunDir(run_dir)
    run = layout.root
    s = open_store(store)
    meta = {"run": run.name, "step": what}
    if layout.config.is_file():
        from fedllm.config import load_config

        meta["config_hash"] = load_config(layout.config).fingerprint()
    written = []
    for rel in layout.step_folders(what):
        folder = run / rel
        if folder.is_dir() and any(folder.iterdir()):
            s.put_dir(folder, rel, meta=meta)
            written.append(rel)
    tops = [(run / n, n, sha256_of_file(run / n), (run / n).stat().st_size) for n in TOP_FILES if (run / n).is_file()]
    s.put_files(tops, "", meta)
    written.append("")
    return written


def describe_store(store: Optional[str]) -> str:
    """The store URI as it may be printed (keys removed)."""
    return redact(store) if store else "none"
