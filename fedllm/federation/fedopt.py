"""FedOpt on the server: NVFlare's FedOpt controller, over fedllm's persistor and aggregator.

Each round the sites train and send their exchanged weights as under FedAvg, and
``RunningWeightedAverage`` takes their weighted mean. The server then steps a torch
optimizer on the global weights with the pseudo-gradient ``global − mean`` (Reddi et al.,
"Adaptive Federated Optimization"): with SGD, lr 1 and no momentum that is FedAvg; with
momentum, FedAvgM; with Adam, FedAdam. The step itself is NVFlare's
(``nvflare.app_opt.pt.fedopt_ctl.FedOpt.optimizer_update``).

Why not NVFlare's ``FedOptRecipe``: it builds its own ``PTFileModelPersistor`` and a
Shareable aggregator for ``ScatterAndGather``, so it takes neither fedllm's
``RoundCheckpointPersistor`` (every round persisted, resume) nor ``RunningWeightedAverage``
(order-independent sums, disk offload, LoRA ``product_svd``). And NVFlare's FedOpt
controller steps a second, whole copy of the model (``source_model``) that starts from the
initial weights on every job start, so a resumed job would step the wrong weights and
restart its momentum. :class:`ServerOptimizer` is that controller with three changes:

- the optimizer steps a module holding only the exchanged tensors (the adapter, for PEFT),
  built from the global model the persistor loaded (the base model's, or a resumed round's);
- the sites send full weights (as under FedAvg), so the pseudo-gradient is taken against
  the global weights here, and the new global weights stay torch tensors in their dtype;
- the optimizer's state (momentum; Adam's moments and step) goes to the persistor with
  every round's weights, which writes it beside them (``server_optimizer.safetensors``);
  a resumed job loads it back, so it continues exactly where the unbroken one was.
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.fedavg import FedAvg
from nvflare.app_opt.pt.fedopt_ctl import FedOpt

from fedllm.errors import FedllmError
from fedllm.federation.persistor import SERVER_OPTIMIZER_STATE
from fedllm.federation.participation import SiteTolerantFedAvg

_FIELD = "::"  # "<parameter name>::<state field>", e.g. "model.x.lora_A.default.weight::momentum_buffer"


class ServerOptimizer(SiteTolerantFedAvg, FedOpt):
    """NVFlare's FedOpt controller stepping the exchanged weights, its state persisted each round.

    Args:
        optimizer_args: ``{"path": "torch.optim.SGD", "args": {"lr": 1.0, "momentum": 0.6}}``
            (NVFlare's format; ``fedllm.federation.algorithms.server_optimizer_args``).
        device: where the server steps, ``"cpu"`` (default): the result does not depend on
            the server's hardware.
        FedAvg's arguments (``num_clients``, ``num_rounds``, ``start_round``, ``persistor_id``,
        ``aggregator``, ...) are passed on.

    Guarantees: the global model of round r+1 is ``optimizer.step()`` applied to round r's
    global weights with gradient ``global − aggregated``, in the global weights' dtype; a
    job started at round k (resume) with round k's persisted weights and optimizer state
    computes the same rounds k+1.. as an unbroken job.
    """

    # the optimizer steps from the old global model: the mean must not overwrite it
    AGGREGATES_INTO_GLOBAL = False

    def __init__(self, *args, source_model: str = "", optimizer_args: Optional[dict] = None,
                 lr_scheduler_args: Optional[dict] = None, device: str = "cpu", **kwargs):
        if not optimizer_args or "path" not in optimizer_args:
            raise FedllmError(f"ServerOptimizer optimizer_args={optimizer_args!r}: expected {{'path': torch.optim class, 'args': {{...}}}}")
        super().__init__(*args, source_model=source_model, optimizer_args=optimizer_args,
                         lr_scheduler_args=lr_scheduler_args, device=device, **kwargs)
        # NVFlare keeps a torch.device, which the job exporter cannot write to the job's config.
        self.device = str(device)
        self.names: list[str] = []

    def run(self) -> None:
        # FedOpt.run builds its optimizer over ``source_model`` before the first round; here the
        # optimizer is built in load_model, over the global weights the persistor loads.
        FedAvg.run(self)

    def load_model(self) -> FLModel:
        model = super().load_model()
        meta = dict(model.meta or {})
        state = meta.pop(SERVER_OPTIMIZER_STATE, None)
        model.meta = meta
        if self.start_round and state is None:
            raise FedllmError(
                f"FedOpt: the persisted round {self.start_round} has no server optimizer state "
                "(server_optimizer.safetensors); a FedOpt federation resumes only from rounds a FedOpt job persisted"
            )
        self.start_optimizer(model.params, state)
        return model

    # -- the server's optimizer -------------------------------------------------------
    def start_optimizer(self, global_weights: dict, state: Optional[dict] = None) -> None:
        """Build the optimizer over a copy of ``global_weights`` (name → tensor), with
        ``state`` (from :meth:`optimizer_state`) when resuming."""
        from nvflare.fuel.utils.class_utils import instantiate_class

        self.names = list(global_weights)
        self.torch_model = parameter_module({name: _tensor(value) for name, value in global_weights.items()})
        self.torch_model.to(self.device)
        args = dict(self.optimizer_args.get("args") or {})
        self.optimizer = instantiate_class(self.optimizer_args["path"], {**args, "params": self.torch_model.parameters()})
        self.lr_scheduler = None
        if self.lr_scheduler_args:
            sched_args = dict(self.lr_scheduler_args.get("args") or {})
            self.lr_scheduler = instantiate_class(self.lr_scheduler_args["path"], {**sched_args, "optimizer": self.optimizer})
        if state:
            self._load_optimizer_state(state)

    def server_step(self, global_weights: dict, aggregated: dict) -> dict:
        """One FedOpt step: the new global weights (name → tensor, the globals' dtypes)
        from this round's ``global_weights`` and the sites' weighted mean ``aggregated``."""
        missing = sorted(set(self.names) - set(aggregated))
        if missing:
            raise FedllmError(f"FedOpt: the aggregated model lacks {missing[:3]}; every site must send every exchanged weight")
        # NVFlare's FedOpt takes the sites' mean *difference* and steps with its negative:
        # mean(w_i) − w_global is that difference, computed here from full weights.
        diff = {name: _tensor(aggregated[name]).to(self.device, dtype=param.dtype) - param.detach()
                for name, param in self.torch_model.named_parameters()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # FedOpt copy-constructs torch.tensor(tensor): intended
            weights, _ = self.optimizer_update(diff)
        return {name: weights[name].detach().to("cpu", copy=True) for name in self.names}

    def optimizer_state(self) -> dict:
        """The optimizer's state as flat tensors ``"<name>::<field>"``: what is persisted."""
        flat = {}
        state = self.optimizer.state_dict()["state"]
        for index, name in enumerate(self.names):
            for field, value in (state.get(index) or {}).items():
                if value is not None:
                    flat[f"{name}{_FIELD}{field}"] = torch.as_tensor(value).detach().to("cpu", copy=True).contiguous()
        return flat

    def _load_optimizer_state(self, flat: dict) -> None:
        index_of = {name: i for i, name in enumerate(self.names)}
        state: dict = {}
        for key, value in flat.items():
            name, _, field = key.rpartition(_FIELD)
            if name not in index_of:
                raise FedllmError(f"FedOpt: the persisted optimizer state names {name!r}, which the global model lacks")
            state.setdefault(index_of[name], {})[field] = _tensor(value)
        self.optimizer.load_state_dict({"state": state, "param_groups": self.optimizer.state_dict()["param_groups"]})

    # -- FedAvg's round, with the step ----------------------------------------------------
    def update_model(self, global_model: FLModel, aggr_result: FLModel) -> FLModel:
        if aggr_result.params_type not in (None, ParamsType.FULL):
            raise FedllmError(f"FedOpt: the sites sent params_type={aggr_result.params_type}; fedllm's sites send full weights")
        stepped = FLModel(params_type=ParamsType.FULL, params=self.server_step(global_model.params, aggr_result.params),
                          metrics=aggr_result.metrics, meta=aggr_result.meta)
        self.info(f"FedOpt ({type(self.optimizer).__name__}, lr {self.optimizer.param_groups[0]['lr']}) "
                  f"stepped {len(self.names)} tensors in round {self.current_round}")
        # FedAvg's bookkeeping (meta, metrics, the context's global model); not FedOpt's,
        # which expects differences and converts every weight to numpy.
        return FedAvg.update_model(self, global_model, stepped)

    def save_model(self, model: FLModel) -> None:
        # The state rides to the persistor in the saved model's meta only: the model the
        # sites receive next round keeps its own meta.
        meta = model.meta
        model.meta = {**(meta or {}), SERVER_OPTIMIZER_STATE: self.optimizer_state()}
        try:
            super().save_model(model)
        finally:
            model.meta = meta


def parameter_module(weights: dict) -> torch.nn.Module:
    """A module whose ``named_parameters()`` and ``state_dict()`` are exactly ``weights``
    (dotted names as given), each a trainable copy."""
    root = torch.nn.Module()
    for name, value in weights.items():
        *path, leaf = name.split(".")
        node = root
        for part in path:
            child = node._modules.get(part)
            if child is None:
                child = torch.nn.Module()
                node.add_module(part, child)
            node = child
        node.register_parameter(leaf, torch.nn.Parameter(value.detach().clone(), requires_grad=True))
    return root


def _tensor(value) -> torch.Tensor:
    if _is_on_disk(value):
        value = value.materialize()
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _is_on_disk(value) -> bool:
    return callable(getattr(value, "materialize", None))
