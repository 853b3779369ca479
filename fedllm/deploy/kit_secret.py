"""A participant's startup kit as a Kubernetes Secret, and back: the one place that knows
how a kit file is named inside a Secret.

``fedllm provision`` writes each kit as an Opaque Secret (``secret_manifest``); a server or
site pod (``fedllm.deploy.participant``) and the chart's ``helm test`` pod
(``fedllm.deploy.check``) read the mounted Secret back as kit files (``kit_files``).

A Secret's keys cannot hold '/', so the kit file ``startup/client.key`` is the key
``startup.client.key``; the kit folders have no dots, so the first dot splits it back.
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Optional

# Kit files a running participant reads; the shell scripts and notebooks NVFlare also
# writes are for hand-started kits and stay out of the Secrets.
KIT_DIRS = ("startup", "local")
SKIPPED_SUFFIXES = (".sh", ".ipynb", ".txt")


def secret_key(rel_path: str) -> str:
    """The Secret data key of a kit file: ``startup/client.key`` -> ``startup.client.key``."""
    folder, _, name = rel_path.partition("/")
    return f"{folder}.{name}"


def kit_path(key: str) -> Optional[str]:
    """The kit file a Secret data key stands for (``startup.client.key`` ->
    ``startup/client.key``), or None for a name that is no kit key (the ``..data`` links
    the kubelet adds to a Secret volume)."""
    folder, dot, name = key.partition(".")
    return f"{folder}/{name}" if dot and folder in KIT_DIRS else None


def secret_data(kit_dir: Path) -> dict[str, bytes]:
    """The files of the NVFlare kit folder ``kit_dir`` that go into its Secret, by Secret key."""
    files = {}
    for folder in KIT_DIRS:
        for f in sorted((kit_dir / folder).glob("*")):
            if f.is_file() and not f.name.endswith(SKIPPED_SUFFIXES):
                files[secret_key(f"{folder}/{f.name}")] = f.read_bytes()
    return files


def secret_manifest(name: str, files: dict[str, bytes], labels: dict[str, str], root_ca_sha256: str) -> dict:
    """One Opaque Secret manifest holding ``files`` (Secret key -> bytes)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"fedllm.io/root-ca-sha256": root_ca_sha256},
        },
        "data": {k: base64.b64encode(v).decode("ascii") for k, v in sorted(files.items())},
    }


def kit_files(kit: Path) -> dict[str, Path]:
    """The files of the kit at ``kit`` by kit path (``startup/client.key``): a mounted kit
    Secret (flat files named by Secret key) or an NVFlare kit folder (``startup/``,
    ``local/``)."""
    files: dict[str, Path] = {}
    if (kit / "startup").is_dir():
        for folder in KIT_DIRS:
            for f in (kit / folder).glob("*"):
                if f.is_file():
                    files[f"{folder}/{f.name}"] = f
    else:
        for f in kit.iterdir():
            rel = kit_path(f.name)
            if rel and f.is_file():
                files[rel] = f
    return files
