"""What a step prints while it runs: the event lines, or a live view of them at a terminal.

``fedllm run`` (and ``federate``, ``train``, ``evaluate``) runs inside :func:`console_output`.
Not at a terminal (a pod, CI, ``| tee``, ``> run.log``), or with ``--log-format json``, stdout carries
the event lines of ``fedllm.events`` exactly as they are written, one per event. At a
terminal (``--log-format auto``, the default, or ``live``) the same lines are read back
instead of shown and drive one live view (``rich``): the experiment's step, each site's
round, step, loss and tokens/s, elapsed time and an ETA.

The view is a consumer of the event stream, not a second reporting path: for the view's
lifetime this process's stdout and stderr (file descriptors 1 and 2, which the
simulator's site processes inherit, and to which they write their event lines through
``/proc/<pid>/fd/1``) are one pipe that a thread reads. An event line updates the view;
any other line (a library's warning) is kept back, and shown on stderr only if the step
fails. The events files (``events/*.jsonl``) are written the same way in both modes.

In both modes the libraries' own progress bars and deprecation warnings are switched
off (:func:`quiet_libraries`), in this process and in the processes it starts.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import math
import os
import select
import stat
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

LOG_FORMATS = ("auto", "live", "json")

# Steps a run goes through; "fedavg" steps are ``fedavg`` and its ``fedavg:<aggregation>``
# variants, "baseline" steps a site alone or centralized. A step without a start event of
# its own (base, evaluate, report) becomes current when the step before it ends.
SILENT_STEPS = ("base", "evaluate", "report")


def wants_live_view(log_format: str = "auto", stream=None) -> bool:
    """``live``; or ``auto`` and ``stream`` (stdout) is a terminal."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
    stream = sys.stdout if stream is None else stream
    return log_format == "live" or (log_format == "auto" and _isatty(stream))


def _isatty(stream) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def quiet_libraries() -> None:
    """No loading bars (tqdm: Hugging Face, lm-eval, datasets) and no deprecation warnings,
    here and in every process started from here (through the environment). A variable the
    user set is left as it is."""
    for name in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning,ignore::FutureWarning")
    for category in (DeprecationWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category)
    # lm-eval's notes on its tasks ("Overwriting default num_fewshot ...") are logged as warnings.
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    # Imported already (a test calling the CLI in-process): the variables came too late.
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()


@dataclass
class Plan:
    """What the view expects a command to go through.

    ``steps``: the step kinds in order (``prepare``, ``base``, ``fedavg`` or
    ``fedavg:<aggregation>``, ``baselines``, ``evaluate``, ``report``); ``baselines``
    stands for every site-alone and centralized setting, counted once the run is
    prepared. ``rounds``: the federation's rounds; ``steps_per_round``: from the
    config when it gives them (the events give each site's own).
    """

    command: str
    steps: list[str]
    rounds: Optional[int] = None
    steps_per_round: Optional[int] = None
    site_alone: bool = True
    centralized: bool = True
    name: str = ""

    @classmethod
    def of_run(cls, cfg, command: str = "run", steps: Optional[list[str]] = None) -> "Plan":
        """The plan of ``fedllm run`` for config ``cfg`` (or of ``steps`` of it)."""
        from fedllm.run import variant_settings

        if steps is None:
            steps = ["prepare", "base", "fedavg", *variant_settings(cfg)]
            if cfg.baselines.site_alone or cfg.baselines.centralized:
                steps.append("baselines")
            steps += ["evaluate"] * bool(cfg.evaluation.enabled) + ["report"]
        return cls(command, steps, rounds=cfg.federation.rounds, steps_per_round=cfg.training.steps_per_round,
                   site_alone=cfg.baselines.site_alone, centralized=cfg.baselines.centralized, name=cfg.name)


@dataclass
class Row:
    """One site of a federation, or one setting trained alone."""

    name: str
    federated: bool
    round: Optional[int] = None  # the round it trains or validates in (or last sent), from 1
    step: int = 0
    steps: Optional[int] = None
    loss: Optional[float] = None
    val_loss: Optional[float] = None
    tokens_per_s: Optional[float] = None
    state: str = "waiting"


@dataclass
class Step:
    kind: str
    label: str
    started: Optional[float] = None
    ended: Optional[float] = None
    rows: list[str] = field(default_factory=list)
    total: Optional[int] = None  # optimizer steps (a federation: one site's, the sites train at once)
    jobs: int = 0  # a federation's job_start events seen
    named: bool = False  # a baseline's label is its setting's name (from its setting_start)


class ProgressView:
    """The state the events build up, and its rendering. ``handle(event)`` may be called
    from any thread; ``render()`` returns a rich renderable of the current state."""

    def __init__(self, plan: Plan, clock: Callable[[], float] = time.monotonic):
        self.plan, self.clock = plan, clock
        self.started = clock()
        self.steps = [Step(kind, kind) for kind in plan.steps]
        self.current = 0
        self.rows: dict[str, Row] = {}
        self.server_round: Optional[int] = None
        self.evaluated = 0
        self.finished = False
        self._lock = threading.Lock()
        self._begin(0)

    # -- the events --------------------------------------------------------------
    def handle_line(self, line: str) -> bool:
        """Take one output line; True if it was an event line (and used)."""
        if not line.startswith("{"):
            return False
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            return False
        if not isinstance(event, dict) or "event" not in event:
            return False
        self.handle(event)
        return True

    def handle(self, e: dict) -> None:
        with self._lock:
            name, site = e.get("event"), str(e.get("site", ""))
            if name == "prepared":
                self._expand_baselines(int(e.get("sites") or 0))
                self._end(self._find_kind("prepare"))
            elif name in ("resume", "job_start"):
                if name == "resume" and e.get("rounds"):
                    self.plan.rounds = int(e["rounds"])
                index = self._find_federation()
                self._begin(index)
                self.steps[index].jobs += name == "job_start"
                if e.get("round") is not None:
                    self.server_round = int(e["round"])
            elif name == "global_model":
                self.server_round = int(e.get("round") or 0)
                if self.plan.rounds and self.server_round >= self.plan.rounds:
                    self._end(self.current)
            elif name == "setting_start":
                index = self._find_setting(site)
                self._begin(index)
                self.steps[index].total = e.get("steps")
                self._row(site, federated=False, steps=e.get("steps"), state="training")
            elif name == "site_start":
                per_round = e.get("steps_per_round")
                total = per_round * self.plan.rounds if per_round and self.plan.rounds else None
                step = self.steps[self.current]
                if total and step.kind.startswith("fedavg"):
                    step.total = max(step.total or 0, total)
                self._row(site, federated=True, steps=total, state="training")
            elif name in ("train", "validate", "round_end", "site_end", "setting_end", "task_metric"):
                row = self.rows.get(site)
                if row is None:
                    row = self._row(site, federated=self.steps[self.current].kind.startswith("fedavg"))
                if e.get("step") is not None:
                    row.step = int(e["step"])
                if name == "train":
                    row.loss, row.state = e.get("loss", row.loss), "training"
                    if e.get("tokens_per_s") is not None:
                        row.tokens_per_s = e["tokens_per_s"]
                    if row.federated and e.get("round") is not None:
                        row.round = int(e["round"]) + 1
                elif name == "validate":
                    row.val_loss, row.state = e.get("loss", row.val_loss), "validated"
                    if row.federated and e.get("round") is not None:
                        row.round = int(e["round"]) + 1
                elif name == "round_end":
                    row.round, row.state = int(e.get("round") or 0) + 1, "round sent"
                    row.loss = e.get("loss", row.loss)
                    row.tokens_per_s = e.get("tokens_per_s") or row.tokens_per_s
                elif name in ("site_end", "setting_end"):
                    row.state = "done"
                    if name == "setting_end":
                        row.val_loss = e.get("loss", row.val_loss)
                        row.tokens_per_s = e.get("tokens_per_s") or row.tokens_per_s
                        self._end(self._find_setting(site))
            elif name == "evaluated":
                self.evaluated += 1
                index = self._find_kind("evaluate")
                self._begin(index)
                if self.evaluated >= self._settings():
                    self._end(index)
            elif name == "run_end":
                for step in self.steps:
                    step.ended = step.ended or self.clock()
                self.current, self.finished = len(self.steps) - 1, True

    # -- the plan ------------------------------------------------------------------
    def _expand_baselines(self, sites: int) -> None:
        """``baselines`` becomes one step per setting trained alone, now that the sites are known."""
        for i, step in enumerate(self.steps):
            if step.kind == "baselines":
                count = sites * self.plan.site_alone + self.plan.centralized
                self.steps[i:i + 1] = [Step("baseline", "site alone" if n < count - self.plan.centralized else "centralized")
                                       for n in range(count)]
                return

    def _find_kind(self, kind: str) -> int:
        """The first step of ``kind`` from the current one on (the current one if none)."""
        return next((i for i in range(self.current, len(self.steps)) if self.steps[i].kind == kind), self.current)

    def _find_federation(self) -> int:
        """The federation a ``job_start`` (or ``resume``) belongs to: the current one, unless
        its job has started already; then the next."""
        for i in range(self.current, len(self.steps)):
            if self.steps[i].kind.startswith("fedavg") and not self.steps[i].jobs:
                return i
        return self.current

    def _find_setting(self, setting: str) -> int:
        """The step of ``setting`` trained alone: named so already, or the next baseline not started."""
        for i in range(self.current, len(self.steps)):
            step = self.steps[i]
            if step.label == setting or (step.kind == "baseline" and not step.named):
                step.label, step.named = setting, True
                return i
        return self.current

    def _settings(self) -> int:
        """How many settings the run compares (each evaluated once)."""
        return sum(1 for s in self.steps if s.kind in ("base", "baseline") or s.kind.startswith("fedavg"))

    def _begin(self, index: int) -> None:
        if index < self.current:
            return
        for step in self.steps[self.current:index]:
            step.ended = step.ended or self.clock()
        self.current = index
        self.steps[index].started = self.steps[index].started or self.clock()

    def _end(self, index: int) -> None:
        if index < self.current:
            return
        self.steps[index].ended = self.clock()
        for name in self.steps[index].rows:
            self.rows[name].state = "done"
        after = index + 1
        if after < len(self.steps) and self.steps[after].kind in SILENT_STEPS:
            self._begin(after)

    def _row(self, name: str, federated: bool, steps: Optional[int] = None, state: str = "waiting") -> Row:
        row = self.rows.get(name)
        if row is None or (federated and row.state == "done"):  # a variant's federation: the same sites again
            row = self.rows[name] = Row(name, federated)
        row.steps, row.state = steps or row.steps, state
        step = self.steps[self.current]
        if name not in step.rows:
            step.rows.append(name)
        return row

    # -- time ------------------------------------------------------------------------
    def _steps_done_and_total(self) -> tuple[int, Optional[int]]:
        """Optimizer steps of every training step of the plan (a federation counts one
        site's: its sites train at the same time): done, and in all (None: not known yet)."""
        done, total = 0, 0
        for step in self.steps:
            if step.kind == "baselines":  # how many: known once the run is prepared
                total = None
            if not (step.kind.startswith("fedavg") or step.kind == "baseline"):
                continue
            if step.ended is not None and step.started is None:  # done before (--resume): not this run's work
                continue
            steps = step.total
            if steps is None and self.plan.steps_per_round and self.plan.rounds:
                steps = self.plan.steps_per_round * self.plan.rounds
            if step.ended is not None:
                done += steps or 0
            elif step.started is not None:
                done += max((self.rows[r].step for r in step.rows if r in self.rows), default=0)
            total = None if steps is None or total is None else total + steps
        return done, total

    def eta(self) -> Optional[float]:
        """Seconds left for the training still to do, at the pace of the training done so
        far; None before the first step or while a step's length is unknown."""
        done, total = self._steps_done_and_total()
        first = next((s.started for s in self.steps if s.kind.startswith("fedavg") or s.kind == "baseline"), None)
        if self.finished:
            return 0.0
        if not done or total is None or first is None:
            return None
        return max(total - done, 0) * (self.clock() - first) / done

    def step_label(self) -> str:
        step = self.steps[self.current]
        if self.finished:
            return "done"
        if step.kind.startswith("fedavg"):
            rounds = self.plan.rounds
            now = min((self.server_round or 0) + 1, rounds) if rounds else (self.server_round or 0) + 1
            return f"{step.kind} round {now} of {rounds}" if rounds else f"{step.kind} round {now}"
        if step.kind == "evaluate" and self._settings():
            settings = self._settings()
            return f"evaluate {min(self.evaluated + 1, settings)} of {settings}"
        return step.label

    # -- rendering -------------------------------------------------------------------
    def render(self):
        from rich.console import Group
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        with self._lock:
            elapsed = self.clock() - self.started
            eta = self.eta()
            done, total = self._steps_done_and_total()
            title = Text.assemble(
                (f"fedllm {self.plan.command}", "bold"),
                (f" {self.plan.name}" if self.plan.name else ""),
                "  ·  ",
                (f"step {self.current + 1}/{len(self.steps)}: ", "dim"),
                (self.step_label(), "bold cyan"),
                "  ·  elapsed ",
                _clock(elapsed),
                "  ·  ETA ",
                _clock(eta) if eta is not None else "–",
            )
            table = Table(box=None, pad_edge=False, header_style="bold", expand=False)
            for column, justify in (("site", "left"), ("round", "right"), ("step", "right"), ("loss", "right"),
                                    ("val loss", "right"), ("tokens/s", "right"), ("", "left")):
                table.add_column(column, justify=justify)
            if self.server_round is not None and any(s.kind.startswith("fedavg") and s.started for s in self.steps):
                table.add_row("server", _of(self.server_round, self.plan.rounds), "", "", "", "", "rounds aggregated")
            for row in self.rows.values():
                table.add_row(
                    row.name,
                    _of(row.round, self.plan.rounds) if row.federated else "",
                    _of(row.step, row.steps) if row.steps or row.step else "",
                    _number(row.loss),
                    _number(row.val_loss),
                    f"{row.tokens_per_s:,.0f}" if row.tokens_per_s else "",
                    Text(row.state, style="green" if row.state == "done" else "yellow"),
                )
            parts = [title]
            if total:
                bar = Table.grid(padding=(0, 1))
                bar.add_row(ProgressBar(total=total, completed=min(done, total), width=50),
                            Text(f"{min(done, total)}/{total} training steps", style="dim"))
                parts.append(bar)
            if self.rows:
                parts.append(table)
            return Group(*parts)


def _terminal_width(fd: int) -> Optional[int]:
    try:
        return os.get_terminal_size(fd).columns or None
    except OSError:
        return None


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _of(value: Optional[int], total: Optional[int]) -> str:
    if value is None:
        return ""
    return f"{value}/{total}" if total else str(value)


def _number(value: Optional[float]) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"


class _OutputPipe:
    """File descriptors 1 and 2 of this process (inherited by the processes it starts)
    become one pipe; a thread hands each line read from it to ``on_line``. The terminal
    stays reachable through :attr:`terminal`, a new descriptor of the old stdout."""

    _MARK = b"\x00fedllm-caught-up\n"

    def __init__(self, on_line: Callable[[str], None]):
        self.on_line = on_line

    def __enter__(self) -> "_OutputPipe":
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal, self._stderr = os.dup(1), os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 1)
        os.dup2(write, 2)
        os.close(write)
        self._stop, self._caught_up = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._pump, name="fedllm-output", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(self.terminal, 1)
        os.dup2(self._stderr, 2)
        os.close(self.terminal)
        os.close(self._stderr)
        self._stop.set()  # a process started here may still hold the pipe: no waiting for its end
        self._thread.join(timeout=5)
        os.close(self._read)

    def catch_up(self, timeout: float = 5.0) -> None:
        """Return once every line written to the pipe so far has been handed on."""
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        self._caught_up.clear()
        os.write(1, self._MARK)
        self._caught_up.wait(timeout)

    def _pump(self) -> None:
        pending = b""
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.2)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            chunk = os.read(self._read, 1 << 16)
            if not chunk:
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                self._deliver(line)
        if pending:
            self._deliver(pending)

    def _deliver(self, raw: bytes) -> None:
        mark = self._MARK.rstrip(b"\n")
        caught_up = raw.endswith(mark)  # after the rest of a line written without its end
        raw = raw[: -len(mark)] if caught_up else raw
        try:
            if raw or not caught_up:
                self.on_line(raw.decode("utf-8", "replace").rstrip("\r"))
        except Exception:  # the view must never stop the pump: writers would block on a full pipe
            pass
        if caught_up:
            self._caught_up.set()


def _stdout_appends() -> None:
    """With stdout redirected to a file (``> run.log``) the site processes append their event
    lines to it (through ``/proc/<pid>/fd/1``) while this process wrote at its own offset,
    over theirs; with O_APPEND this process appends too, and the file gets every line."""
    with contextlib.suppress(OSError):
        if stat.S_ISREG(os.fstat(1).st_mode):
            fcntl.fcntl(1, fcntl.F_SETFL, fcntl.fcntl(1, fcntl.F_GETFL) | os.O_APPEND)


@contextlib.contextmanager
def console_output(plan: Plan, log_format: str = "auto") -> Iterator[Optional[ProgressView]]:
    """Run a command's steps with the output ``log_format`` asks for (see the module's
    docstring); yields the live view, or None for JSON lines. Whatever other output
    the view kept back goes to stderr if the body raises."""
    quiet_libraries()
    if not wants_live_view(log_format):
        _stdout_appends()
        yield None
        return
    from rich.console import Console
    from rich.live import Live

    view = ProgressView(plan)
    other: collections.deque[str] = collections.deque(maxlen=200)

    def on_line(line: str) -> None:
        if not view.handle_line(line) and line.strip():
            other.append(line)

    failed = True
    with _OutputPipe(on_line) as pipe:
        terminal = os.fdopen(os.dup(pipe.terminal), "w", buffering=1)
        # rich sizes itself from fds 0-2; 1 and 2 are the pipe now, and 0 may not be the terminal.
        width = None if _isatty(sys.stdin) else _terminal_width(pipe.terminal)
        console = Console(file=terminal, force_terminal=True if log_format == "live" else None, width=width)
        try:
            with Live(get_renderable=view.render, console=console, refresh_per_second=4,
                      redirect_stdout=False, redirect_stderr=False):
                try:
                    yield view
                finally:
                    pipe.catch_up()  # the view's last frame shows every event written until now
            failed = False
        finally:
            terminal.close()
    if failed and other:
        print("\n".join(other), file=sys.stderr)
