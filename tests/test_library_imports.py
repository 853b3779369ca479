"""Importing fedllm's training code changes nothing global: Lightning's log level and the
warning filters change only when a module or trainer for training is built
(``fedllm.train.site.quiet_training_logs``).

Each check runs in a fresh interpreter, so what the test session imported before does
not matter.
"""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import REPO

# What the libraries themselves do on import (torch, numpy and Lightning add warning
# filters; Lightning sets its logger to INFO) is not fedllm's: every module the import
# below loads, except fedllm's own, is imported first.
LOADED_BY = """
import sys
import fedllm.train.site
print("\\n".join(m for m in sys.modules if m != "fedllm" and not m.startswith("fedllm.")))
"""

IMPORT_AFTER = """
import importlib, json, logging, sys, warnings
for name in sys.stdin.read().split():
    try:
        importlib.import_module(name)
    except Exception:
        pass  # an alias or a compiled part that is not importable by name
state = lambda: [logging.getLogger(n).level for n in ("pytorch_lightning", "lightning.pytorch")] + [repr(f) for f in warnings.filters]
before = state()
import fedllm.train.site
after_import = state()
fedllm.train.site.quiet_training_logs()
after_quiet = state()
print(json.dumps({"before": before, "after_import": after_import, "after_quiet": after_quiet}))
"""


def python(code: str, stdin: str = "") -> str:
    done = subprocess.run([sys.executable, "-c", code], input=stdin, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_importing_site_leaves_logging_and_warnings_alone():
    states = json.loads(python(IMPORT_AFTER, stdin=python(LOADED_BY)).splitlines()[-1])
    assert states["after_import"] == states["before"]
    # ... and building for training is what quiets them
    levels, filters = states["after_quiet"][:2], states["after_quiet"][2:]
    assert levels == [30, 30]  # logging.WARNING
    assert any("LeafSpec" in f for f in filters) and not any("LeafSpec" in f for f in states["before"][2:])
