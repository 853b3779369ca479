"""What `fedllm run` prints: at a terminal one live view and no event line; piped (a pod,
CI, `| tee`) the event lines only, one per event, exactly as the events files hold them.

Both are the tiny run of tests/cli_runs.py (2 sites x 2 rounds, each site alone, centralized);
the piped one is the session's run that test_tracking.py also checks (tests/tracked_runs.py:
the same config with MLflow and TensorBoard on, which must not add a line either).
"""

from __future__ import annotations

import collections
import fcntl
import json
import os
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest

from cli_runs import tiny_config
from conftest import REPO

SITES = ("dolly", "oasst1")  # tiny_config's two sources, one site each
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")
NOISE = ("Loading weights", "Writing model shards", "it/s]", "Epoch 0", "Warning", "warn(")


def run_at_a_terminal(*args: str, timeout: float = 900) -> tuple[int, str]:
    """Run the ``fedllm`` CLI with a pseudo-terminal (120 x 40) as its stdin, stdout and
    stderr, as `make run` in a terminal; its exit code and all it wrote, escapes removed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    process = subprocess.Popen([sys.executable, "-m", "fedllm.cli", *args], cwd=REPO, stdin=slave, stdout=slave,
                               stderr=slave, env=dict(os.environ, TERM="xterm-256color"), start_new_session=True)
    os.close(slave)
    written, deadline = bytearray(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        if select.select([master], [], [], 1.0)[0]:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # EIO: every holder of the terminal has closed it
                break
            if not chunk:
                break
            written += chunk
        elif process.poll() is not None:
            break
    else:
        process.kill()
    os.close(master)
    code = process.wait(timeout=60)
    return code, ANSI.sub("", written.decode("utf-8", "replace")).replace("\r", "\n")


@pytest.fixture(scope="module")
def config(tmp_path_factory, shared_data):
    return tiny_config(tmp_path_factory.mktemp("progress"), rounds=2)


@pytest.mark.slow
def test_at_a_terminal_the_run_shows_the_live_view_and_no_event_line(config, tmp_path):
    code, screen = run_at_a_terminal("run", str(config), "--out", str(tmp_path / "run"))
    assert code == 0, screen[-3000:]

    assert '{"ts"' not in screen and '"event"' not in screen
    for text in ("fedllm run", "ETA", "elapsed", "prepare", "fedavg round 1 of 2", "fedavg round 2 of 2",
                 "site:dolly", "centralized", "tokens/s", "val loss", "server"):
        assert text in screen, text
    for site in SITES:  # a row per site, at its round
        assert re.search(rf"^{site}\s+2/2\s", screen, re.MULTILINE), site
    assert "step 7/7: done" in screen  # prepare, base, fedavg, 2 sites alone, centralized, report
    for noise in NOISE:
        assert noise not in screen, noise
    # After the view: the results table and where the report is.
    assert screen.index("summary:") > screen.rindex("ETA")
    assert "FedAvg" in screen[screen.rindex("ETA"):]


@pytest.mark.slow
def test_piped_the_run_prints_the_event_lines_only_one_per_event(tracked_cli_run):
    # The session's tiny run (tests/tracked_runs.py), shared with test_tracking.py: this
    # file's config with MLflow and TensorBoard on, its stdout piped, no --no-progress.
    run, done = tracked_cli_run.root, tracked_cli_run.done

    lines = [line for line in done.stdout.splitlines() if line.strip()]
    printed = [json.loads(line) for line in lines]  # every line: an event
    assert all(isinstance(e, dict) and "event" in e for e in printed)
    assert printed[0]["event"] == "prepared" and printed[-1]["event"] == "run_end"
    # Exactly the lines the events files hold (the sites' and the server's come from other
    # processes), each once; the driver's own events (prepared, run_end) are only here.
    in_files = collections.Counter(line for path in (run / "events").glob("*.jsonl")
                                   for line in path.read_text().splitlines())
    assert sum(in_files.values()) > 20
    assert not in_files - collections.Counter(lines), "events in the files but not on stdout"
    assert {"job_start", "round_end", "global_model", "setting_end"} <= {e["event"] for e in printed}
    assert len(lines) == len(set(lines)), "an event printed twice"

    # The closing summary goes to stderr, and no library noise anywhere.
    assert "summary:" in done.stderr and "FedAvg" in done.stderr
    for noise in NOISE[:4]:
        assert noise not in done.stdout + done.stderr, noise


def test_the_view_follows_a_run_with_a_variant_and_evaluation_from_its_events():
    """The steps of a run as its events arrive, without running it: a FedAvg variant, each
    site alone, centralized, lm-eval; the ETA from the pace of the training steps done."""
    from rich.console import Console

    from fedllm.progress import Plan, ProgressView

    now = [0.0]
    plan = Plan("run", ["prepare", "base", "fedavg", "fedavg:product_svd", "baselines", "evaluate", "report"],
                rounds=2, steps_per_round=3, name="t")
    view = ProgressView(plan, clock=lambda: now[0])

    def events(*records, seconds=1.0):
        for record in records:
            now[0] += seconds
            assert view.handle_line(json.dumps(record))
        return view.step_label()

    def screen() -> str:
        console = Console(width=120, record=True, file=open(os.devnull, "w"))
        console.print(view.render())
        return console.export_text()

    assert view.step_label() == "prepare" and not view.handle_line("Loading weights: 100%")
    assert events({"event": "prepared", "site": "driver", "sites": 2}) == "base"
    assert len(view.steps) == 9  # the baselines: 2 sites alone and centralized
    for variant in ("fedavg", "fedavg:product_svd"):
        assert events({"event": "job_start", "site": "server", "round": 0}) == f"{variant} round 1 of 2"
        events(*({"event": "site_start", "site": s, "steps_per_round": 3} for s in ("a", "b")))
        for r in (0, 1):
            events(*({"event": "round_end", "site": s, "round": r, "step": 3 * (r + 1), "loss": 2.5, "tokens_per_s": 900.0}
                     for s in ("a", "b")), seconds=10)
            label = events({"event": "global_model", "site": "server", "round": r + 1})
        assert label == f"{variant} round 2 of 2"
    assert "a" in screen() and "2/2" in screen() and "6/6" in screen()
    # 12 of 30 training steps done in 89 s since the first began (at 2 s): 18 left.
    assert now[0] == 91 and view.eta() == pytest.approx(18 * 89 / 12)

    for setting in ("site:a", "site:b", "centralized"):
        assert events({"event": "setting_start", "site": setting, "steps": 6}) == setting
        events({"event": "validate", "site": setting, "step": 3, "loss": 2.0})
        assert f"{setting}" in screen() and "3/6" in screen()
        label = events({"event": "setting_end", "site": setting, "step": 6, "loss": 1.9, "tokens_per_s": 500.0})
    assert label == "evaluate 1 of 6"
    for n in range(1, 7):
        label = events({"event": "evaluated", "site": "x", "mean": 0.5})
        assert label == ("report" if n == 6 else f"evaluate {n + 1} of 6")
    events({"event": "run_end", "site": "driver"})
    assert view.step_label() == "done" and view.eta() == 0 and "step 9/9: done" in screen()


def test_the_view_of_one_setting_trained_alone_names_it():
    """`fedllm train RUN --setting site:a`: its one step takes the setting's name."""
    from fedllm.progress import Plan, ProgressView

    view = ProgressView(Plan("train", ["baseline"], rounds=2, steps_per_round=2))
    assert view.step_label() == "baseline"
    view.handle({"event": "setting_start", "site": "site:a", "steps": 4})
    assert view.step_label() == "site:a" and view.rows["site:a"].steps == 4
    view.handle({"event": "setting_end", "site": "site:a", "step": 4, "loss": 1.5})
    assert view.step_label() == "site:a" and view.rows["site:a"].state == "done" and view.eta() == 0


CHILD_APPENDS = """
import os, subprocess, sys
from fedllm import events
from fedllm.progress import Plan, console_output

with console_output(Plan("federate", ["fedavg"]), "auto"):
    events.emit("job_start", site="server", round=0)
    # a site process of the simulator: it appends to this process's stdout by its /proc path
    child = "open(f'/proc/{os.getppid()}/fd/1', 'a').write('{\\"event\\": \\"round_end\\", \\"site\\": \\"a\\"}\\\\n')"
    subprocess.run([sys.executable, "-c", "import os; " + child], check=True)
    events.emit("global_model", site="server", round=1)
"""


def test_stdout_redirected_to_a_file_gets_the_site_processes_lines_too(tmp_path):
    """`fedllm federate ... > run.log`: the sites' lines are not overwritten by the driver's."""
    log = tmp_path / "run.log"
    with open(log, "w") as stdout:
        subprocess.run([sys.executable, "-c", CHILD_APPENDS], cwd=REPO, stdout=stdout, check=True, timeout=120)
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == ["job_start", "round_end", "global_model"]


def test_nvflare_warnings_in_the_simulators_processes_go_to_stderr_not_stdout(tmp_path):
    # A loaded machine makes a simulated site log "Failed to get_task from server" (CI saw it
    # land among a piped run's event lines): the log configuration the simulator and its
    # worker processes read must keep stdout for events.
    from fedllm.federation.federate import _write_simulator_log_config

    config = _write_simulator_log_config(tmp_path)
    worker = ("import logging, sys\n"
              "from nvflare.fuel.utils.log_utils import dynamic_log_config\n"
              "dynamic_log_config(sys.argv[1], sys.argv[2], reload_path=sys.argv[1])\n"
              "logging.getLogger('Communicator').warning('Failed to get_task from server.')\n"
              "logging.getLogger('Communicator').info('chatter')\n")
    done = subprocess.run([sys.executable, "-c", worker, str(config), str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert "Failed to get_task from server." in done.stderr and "chatter" not in done.stderr
    assert "Failed to get_task from server." in (tmp_path / "log.txt").read_text()
