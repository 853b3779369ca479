"""Rounds that survive their sites: a FedAvg controller that needs ``min_clients`` results, not all.

NVFlare's FedAvg sends each round to ``num_clients`` sites (a random subset when fewer than
the connected sites) and waits for every one of them: one site that dies mid-round either
ends the job or leaves it waiting forever. fedllm's controller instead

- sends every round to every connected site and needs ``min_responses`` of them
  (``federation.min_clients``, default all);
- once the minimum has reported, waits ``wait_after_min_responses`` more seconds for the
  rest, then aggregates what came (the weights are renormalised over the sites aggregated:
  the aggregator divides by the weights it summed);
- bounds the whole round by a timeout derived from the model and the rounds so far (see
  :func:`round_timeout`), unless ``round_timeout`` is set;
- counts a site as lost when its result is an error (its training process died: NVFlare's
  launcher answers the task with an error code) or never came; each lost site gets a
  ``site_lost`` event (site, round, reason) in the server's event log. A site whose
  training process died launches a new one at its next task and is back in the next round
  (fedllm.federation.relaunch);
- counts only results the aggregator accepted (``accept_model`` returns False for a rejected
  update: fedllm.federation.aggregation), and fails the round when fewer than the minimum
  were aggregated, with a ``round_failed`` event and an error naming the missing sites. The
  job then stops; ``fedllm run --resume`` continues from the last persisted round.

The aggregated model's meta carries ``lost_sites`` beside the aggregator's
``aggregated_sites`` / ``rejected_sites``; the persistor writes them into the round's
``global_model`` event and summary.json reports them per round.
"""

from __future__ import annotations

import math
import time
from typing import Optional

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel

from fedllm import events
from fedllm.federation.tuning import TunedFedAvg
from fedllm.tensors import tensor_bytes

#: seconds a first round may take when nothing is measured yet (a real model's first round
#: on a CPU site can take many minutes; a lost site is then found by its error result)
FIRST_ROUND_TIMEOUT_S = 3600.0
#: later rounds: at least this long, else ``ROUND_TIME_FACTOR`` × the slowest round so far
MIN_ROUND_TIMEOUT_S = 300.0
ROUND_TIME_FACTOR = 3.0
#: after the minimum reported: at least this long, else the slowest round so far
MIN_WAIT_AFTER_MIN_S = 30.0


def round_timeout(model_bytes: int, slowest_round_s: Optional[float], min_bandwidth: float, sites: int = 1) -> float:
    """Seconds a round of ``sites`` may last before the sites that have not reported count as lost.

    The global model goes down to each site and its update comes back, ``model_bytes`` each
    way at ``min_bandwidth`` bytes/s, where the server may send to the sites one after
    another and receives updates ``RECEIVE_AT_ONCE`` at a time (fedllm.federation.sending):
    ``sites + ceil(sites / RECEIVE_AT_ONCE)`` transfers (2 for one site), on top of the
    training time, which is ``ROUND_TIME_FACTOR`` × the slowest completed round (at least
    ``MIN_ROUND_TIMEOUT_S``), or ``FIRST_ROUND_TIMEOUT_S`` before any round completed.
    """
    from fedllm.federation.sending import RECEIVE_AT_ONCE

    training = FIRST_ROUND_TIMEOUT_S if slowest_round_s is None else max(MIN_ROUND_TIMEOUT_S, ROUND_TIME_FACTOR * slowest_round_s)
    transfers = max(1, sites) + math.ceil(max(1, sites) / RECEIVE_AT_ONCE)
    return training + transfers * model_bytes / min_bandwidth


class SiteTolerantFedAvg(TunedFedAvg):
    """NVFlare's FedAvg (with fedllm's round tuning) that completes a round with ``min_responses`` sites.

    Args (besides FedAvg's):
        min_responses: results a round needs; 0 = every connected site.
        round_timeout: seconds a round may last; 0 = derived (:func:`round_timeout`).
        wait_after_min_responses: seconds to wait for the other sites once the minimum has
            reported; < 0 = derived (the slowest round so far, at least ``MIN_WAIT_AFTER_MIN_S``;
            the whole round timeout before a round completed).
        min_bandwidth: bytes/s the derived timeout assumes for the model's transfers.
        events_file: the server's event log (``site_lost``, ``round_failed``).
        share_global_model: send the sites the global model's own tensors, not a copy.
            NVFlare's server deep-copies a broadcast task's data before the first site gets
            it (a whole second model for the round) to protect it from filters that change
            it in place; fedllm's only such filter is quantization's, so the job sets this
            whenever there is no ``federation.quantization``. The global model is changed
            only after the round's task ended (the mean is written into it: see below).

    The round's mean is written into the global model's tensors (the aggregator's
    ``begin_round(..., into_global=True)``): the server holds one model, whatever the round.

    Constructor arguments are kept as same-named attributes: NVFlare's Job API re-creates
    the component from them.
    """

    #: the round's mean becomes the next global model (FedOpt's controller steps from the old one)
    AGGREGATES_INTO_GLOBAL = True

    def __init__(self, *args, min_responses: int = 0, round_timeout: float = 0.0,
                 wait_after_min_responses: float = -1.0, min_bandwidth: float = 1e6, events_file: str = "",
                 share_global_model: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.share_global_model = share_global_model
        if share_global_model:
            _check_broadcast_copy_attribute()
        self.min_responses = min_responses
        self.round_timeout = round_timeout
        self.wait_after_min_responses = wait_after_min_responses
        self.min_bandwidth = min_bandwidth
        self.events_file = events_file
        self._round_seconds: list[float] = []
        self._targets: list[str] = []
        self._outcome: dict[str, str] = {}  # site -> "aggregated" | "rejected" | "failed: ..."
        self._round_started = 0.0

    def sample_clients(self, num_clients: int = None) -> list[str]:
        # Every connected site trains every round: ``num_clients`` is the job's minimum to
        # start (the recipe's min_clients), not a sample size.
        return super().sample_clients(None)

    def send_model(self, task_name: str = "train", data: FLModel = None, targets=None, min_responses: int = None,
                   timeout: int = 0, callback=None) -> None:
        self._targets = [t if isinstance(t, str) else t.name for t in (targets or self.engine.get_clients())]
        self._outcome = {}
        self._round_started = time.monotonic()
        begin_round = getattr(self.aggregator, "begin_round", None)
        if callable(begin_round):
            # its update_rejected events name round-<k> as site_lost does
            begin_round(data.params, self._round_number(), into_global=self.AGGREGATES_INTO_GLOBAL)
        required = self._required()
        limit = self.round_timeout or round_timeout(tensor_bytes(data.params or {}), self._slowest(), self.min_bandwidth,
                                                    sites=len(self._targets))
        wait = self.wait_after_min_responses
        if wait < 0:
            wait = limit if self._slowest() is None else max(MIN_WAIT_AFTER_MIN_S, self._slowest())
        self.info(f"round {self.current_round}: {len(self._targets)} sites, {required} needed, "
                  f"timeout {limit:.0f}s, wait after the minimum {wait:.0f}s")
        self.broadcast_model(
            data=data, task_name=task_name, targets=self._targets,
            # NVFlare reads 0 as "all targets"
            min_responses=required if required < len(self._targets) else 0,
            timeout=int(math.ceil(limit)), wait_time_after_min_received=int(math.ceil(wait)),
            blocking=False, callback=callback,
        )

    def _prepare_task(self, *args, **kwargs):
        task = super()._prepare_task(*args, **kwargs)
        if self.share_global_model:
            # WFCommServer deep-copies task.data into this attribute at the first site's
            # request unless it is already there: it then sends the global model itself.
            task._broadcast_data = task.data
        return task

    def _required(self) -> int:
        return min(self.min_responses, len(self._targets)) if self.min_responses else len(self._targets)

    def _slowest(self) -> Optional[float]:
        return max(self._round_seconds) if self._round_seconds else None

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext,
                             is_unknown_task: bool = False) -> bool:
        rc = result.get_return_code()
        if is_unknown_task or not rc or rc == ReturnCode.OK:
            return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task)
        # The site's training failed (its process died, or raised): it is lost for this
        # round. The round goes on while the minimum can still be reached.
        self.fl_ctx = fl_ctx
        self._outcome[client_name] = f"its result is an error ({rc})"
        self._site_lost(client_name, self._outcome[client_name])
        still_possible = len(self._targets) - sum(1 for o in self._outcome.values() if o != "aggregated")
        if still_possible < self._required():
            self._fail_round(still_possible)  # the job stops: waiting for the others cannot complete the round
        return False

    def _aggregate_one_result(self, result: FLModel) -> bool:
        site = str((result.meta or {}).get("client_name", ""))
        if self.aggregator is None or not result.params:
            accepted = super()._aggregate_one_result(result)
        else:
            # NVFlare's FedAvg ignores accept_model's answer; a rejected update must not count.
            accepted = self.aggregator.accept_model(result) is not False
            if accepted:
                self._received_count += 1
                self.info(f"Aggregated {self._received_count}/{self._expected_count} results")
        self._outcome[site] = "aggregated" if accepted else "rejected"
        return accepted

    def _get_aggregated_result(self) -> FLModel:
        for site in self._targets:
            if site not in self._outcome:
                self._outcome[site] = "no result before the round ended"
                self._site_lost(site, self._outcome[site])
        aggregated = [s for s in self._targets if self._outcome[s] == "aggregated"]
        if len(aggregated) < self._required() or not aggregated:
            raise RuntimeError(self._fail_round(len(aggregated)))
        self._round_seconds.append(time.monotonic() - self._round_started)
        result = super()._get_aggregated_result()
        result.meta["lost_sites"] = {s: o for s, o in self._outcome.items() if o not in ("aggregated", "rejected")}
        return result

    def _round_number(self) -> int:
        # the number of the global model this round makes (round-<k>, 1-based), as the
        # persistor's global_model event names it
        return int(self.current_round) + 1

    def _site_lost(self, site: str, reason: str) -> None:
        self.warning(f"round {self._round_number()}: site {site} lost: {reason}")
        events.emit("site_lost", file=self.events_file or None, site="server", round=self._round_number(),
                    lost_site=site, reason=reason)

    def _fail_round(self, reachable: int) -> str:
        """Stop the job: the round cannot reach its minimum. Returns the error message."""
        missing = {s: o for s, o in self._outcome.items() if o != "aggregated"}
        missing.update({s: "no result yet" for s in self._targets if s not in self._outcome})
        aggregated = [s for s in self._targets if self._outcome.get(s) == "aggregated"]
        message = (f"round {self._round_number()} needs {self._required()} of {len(self._targets)} sites "
                   f"(federation.min_clients) but can aggregate at most {reachable}: "
                   + "; ".join(f"{s}: {why}" for s, why in sorted(missing.items())))
        events.emit("round_failed", file=self.events_file or None, site="server", round=self._round_number(),
                    required=self._required(), aggregated=aggregated, missing=missing, message=message)
        self.panic(message)
        return message


def _check_broadcast_copy_attribute() -> None:
    """``share_global_model`` relies on NVFlare 2.9's WFCommServer reusing ``task._broadcast_data``
    when it is set; fail loudly, naming the version, if that moved."""
    import inspect

    import nvflare
    from nvflare.apis.impl import wf_comm_server

    if 'hasattr(task, "_broadcast_data")' not in inspect.getsource(wf_comm_server):
        raise RuntimeError(
            f"nvflare {nvflare.__version__}: WFCommServer no longer copies a broadcast task's data into "
            "task._broadcast_data; fedllm.federation.participation's share_global_model was written for 2.9"
        )
