"""Run dirs made of pipeline artifacts, and artifacts cut out of run dirs.

A Kubeflow step sees the run dir the way ``fedllm run`` builds it in one place,
but in pieces: the prepared run (config, partitions, base model) is one input
artifact, each finished setting another. ``open_workspace`` lays those pieces
out as one run dir the library functions work in; ``pack_new_files`` copies out
only what the step added, which becomes the step's output artifact.

Inputs are never changed: in a link workspace every input file is a symlink in
a real directory, and the library writes by temp file + rename, which replaces
a link rather than writing through it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Optional

from fedllm.rundir import WORKSPACE

# NVFlare's simulator workspace (job copies, logs, its own model files): large,
# and nothing downstream reads it; the per-round global models are kept.
LEFT_OUT = (WORKSPACE,)


def open_workspace(sources: Iterable[str | os.PathLike], under: Optional[str | os.PathLike] = None, copy: bool = False) -> Path:
    """A new run dir holding every file of ``sources`` (later sources win).

    With ``copy=False`` files are symlinks to the sources (cheap, for steps that
    run on this machine); with ``copy=True`` they are real copies, for a run dir
    other processes must read (a federation on a shared volume). The directory
    is made under ``under`` (default: the system temp dir) and left for the
    caller to remove.
    """
    work = Path(tempfile.mkdtemp(prefix="fedllm-run-", dir=under)).resolve()
    for source in sources:
        source = Path(source)
        for path in sorted(source.rglob("*")):
            if path.is_dir():
                continue
            target = work / path.relative_to(source)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists() or target.is_symlink():
                target.unlink()
            if copy:
                shutil.copy2(path, target)
            else:
                target.symlink_to(path.resolve())
    return work


def pack_new_files(work: str | os.PathLike, out: str | os.PathLike, baseline: Optional[str | os.PathLike] = None) -> list[str]:
    """Copy the files a step wrote in ``work`` to ``out``; return their relative paths.

    A file is new when it is not a symlink and, if ``baseline`` is given (the
    run dir a copy workspace was made from), it is not there with the same size
    and modification time. Files under ``LEFT_OUT`` are skipped.
    """
    work, out = Path(work), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in sorted(work.rglob("*")):
        rel = path.relative_to(work)
        if path.is_symlink() or path.is_dir() or any(rel.as_posix().startswith(p + "/") for p in LEFT_OUT):
            continue
        if baseline is not None and _same_file(path, Path(baseline) / rel):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, out / rel)
        written.append(rel.as_posix())
    return written


def copy_run(work: str | os.PathLike, out: str | os.PathLike) -> None:
    """``work`` as a self-contained run dir at ``out``: links followed, ``LEFT_OUT`` skipped."""
    work, out = Path(work), Path(out)
    for path in sorted(work.rglob("*")):
        rel = path.relative_to(work)
        if path.is_dir() or any(rel.as_posix().startswith(p + "/") for p in LEFT_OUT):
            continue
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, out / rel)


def _same_file(a: Path, b: Path) -> bool:
    if not b.is_file():
        return False
    sa, sb = a.stat(), b.stat()
    return sa.st_size == sb.st_size and int(sa.st_mtime) == int(sb.st_mtime)
