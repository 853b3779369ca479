"""One module owns the run folder's layout (``fedllm.rundir``); the library imports none of
its faces; a setting's result is checked when it is written, not when the report reads it."""

from __future__ import annotations

import ast
import re

import pytest

from conftest import REPO
from fedllm.errors import FedllmError
from fedllm.rundir import RunDir, Setting

LIBRARY = REPO / "fedllm"
LAYOUT_MODULE = LIBRARY / "rundir.py"

# Run-folder paths spelled as literals: joined path parts, file names, round folders,
# setting names turned into file names.
LAYOUT_LITERALS = re.compile(
    r'/ "(models|settings|evals|events|tasks|federation|data|report|base|rounds|variants)"'
    r'|"(config\.yaml|model\.json|summary\.json|partition\.json|best\.json|exchanged\.safetensors|meta\.json)"'
    r'|round-\{|"round-'
    r'|replace\(\s*"?:"?\s*,\s*"-"\s*\)|replace\(\s*\':\'\s*,\s*\'-\'\s*\)'
)
# Folders of the same names that are not the run folder's: lm-eval's task folder in a
# temporary evaluation workspace.
NOT_THE_RUN_FOLDER = {("fedllm/evaluate/run.py", '/ "tasks"')}


def library_modules():
    return sorted(p for p in LIBRARY.rglob("*.py") if "__pycache__" not in p.parts)


def test_the_run_folder_layout_is_spelled_in_one_module():
    found = []
    for path in library_modules():
        if path == LAYOUT_MODULE:
            continue
        rel = path.relative_to(REPO).as_posix()
        for number, line in enumerate(path.read_text().splitlines(), 1):
            for match in LAYOUT_LITERALS.finditer(line):
                if (rel, match.group(0)) not in NOT_THE_RUN_FOLDER:
                    found.append(f"{rel}:{number}: {match.group(0)}  ({line.strip()})")
    assert not found, "run-folder paths spelled outside fedllm/rundir.py:\n" + "\n".join(found)


def test_the_library_imports_none_of_its_faces():
    """No module under fedllm/ imports the Kubeflow pipeline or its components, reaches
    them through sys.path, or reads the Helm chart from a checkout."""
    faces = {"pipelines", "components", "charts", "tests", "bench"}
    found = []
    for path in library_modules():
        rel = path.relative_to(REPO).as_posix()
        source = path.read_text()
        for node in ast.walk(ast.parse(source, filename=rel)):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module or ""]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
                names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            else:
                continue
            for name in names:
                if name.split(".")[0] in faces:
                    found.append(f"{rel}:{node.lineno}: imports {name}")
        for number, line in enumerate(source.splitlines(), 1):
            if "sys.path" in line or re.search(r'"charts"|/charts/|parents\[\d\]\s*/\s*"', line):
                found.append(f"{rel}:{number}: {line.strip()}")
    assert not found, "the library reaches into its faces:\n" + "\n".join(found)


@pytest.mark.parametrize("text, kind, name, slug", [
    ("base", "base", "", "base"),
    ("centralized", "centralized", "", "centralized"),
    ("fedavg", "fedavg", "", "fedavg"),
    ("fedavg:product_svd", "fedavg", "product_svd", "fedavg-product_svd"),
    ("site:clinic-a", "site", "clinic-a", "site-clinic-a"),
])
def test_a_setting_parses_prints_and_names_its_files(tmp_path, text, kind, name, slug):
    setting = Setting.parse(text)
    assert (setting.kind, setting.name, str(setting), setting.slug) == (kind, name, text, slug)
    layout = RunDir(tmp_path)
    assert layout.setting_file(text) == tmp_path.resolve() / "settings" / f"{slug}.json"
    assert layout.eval_file(setting) == tmp_path.resolve() / "evals" / f"{slug}.json"
    assert layout.model(setting) == tmp_path.resolve() / "models" / slug


@pytest.mark.parametrize("text", ["", "site", "site:", "base:x", "centralized:all", "fedprox", "Site:a"])
def test_an_unknown_setting_is_refused_by_name(text):
    with pytest.raises(FedllmError, match=f"setting {re.escape(repr(text))}: expected base, centralized"):
        Setting.parse(text)


def test_the_layout_names_every_step_s_folders(tmp_path):
    """What each step publishes to the store, under the run folder's own names."""
    layout = RunDir(tmp_path)
    assert layout.step_folders("prepared") == ["data", "models/base"]
    assert layout.step_folders("fedavg") == ["settings", "models/fedavg", "events", "tasks", "tracking"]
    assert layout.step_folders("setting:site:a") == ["settings", "models/site-a", "events", "tasks", "tracking"]
    assert layout.step_folders("setting:fedavg:product_svd") == [
        "settings", "variants/fedavg-product_svd/models/fedavg", "variants/fedavg-product_svd/events",
        "variants/fedavg-product_svd/tasks", "variants/fedavg-product_svd/tracking"]
    assert layout.round(7) == tmp_path.resolve() / "federation" / "rounds" / "round-007"
    assert layout.baseline_events("site:site-1") != layout.site_events("site-1")
    with pytest.raises(FedllmError, match="publish: unknown step 'bogus'"):
        layout.step_folders("bogus")


def test_a_setting_result_is_checked_when_it_is_written(tmp_path):
    from fedllm.run import check_setting_result

    good = {"kind": "site", "site": "a", "val_loss": 1.5, "model_dir": "models/base", "adapter_dir": "models/site-a"}
    check_setting_result(good, "settings/site-a.json")
    check_setting_result({**good, "val_loss": float("nan")}, "x")  # a diverged run is still a result
    with pytest.raises(FedllmError, match="settings/site-a.json: site: missing from a site result"):
        check_setting_result({k: v for k, v in good.items() if k != "site"}, "settings/site-a.json")
    with pytest.raises(FedllmError, match="x: kind: expected one of base, site, centralized, federated, got 'fedavg'"):
        check_setting_result({**good, "kind": "fedavg"}, "x")
    with pytest.raises(FedllmError, match="x: val_loss: expected a number, got '1.5'"):
        check_setting_result({**good, "val_loss": "1.5"}, "x")
    with pytest.raises(FedllmError, match="x: time_per_round_s: missing from a federated result"):
        check_setting_result({**good, "kind": "federated", "val_loss_curve": [], "rounds": []}, "x")
