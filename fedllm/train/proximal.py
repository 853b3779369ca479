"""FedProx's proximal term at a site: mu/2·Σ‖w − w_global‖² over the weights it trains.

The term is NVFlare's ``PTFedProxLoss``, taken over the site's trainable parameters only —
exactly the weights it exchanges (the adapter, for PEFT; every weight for SFT) — against a
detached copy of those same tensors as the site received them this round. The frozen base
of a PEFT model is the same at every site and never moves, so it adds nothing to the term
and is not copied.

    term = ProximalTerm(mu=0.01)
    term.start_round(model)          # after the global weights are loaded
    loss = task_loss + term(model)   # gradient mu·(w − w_global) on each trainable weight

NVFlare 2.9's patched Lightning trainer can also inject the proximal *gradient* itself when
the server sends ``fedprox_mu`` in the task's meta, but only at precision ``32-true`` or
``bf16-mixed``; a term in the loss works at every precision fedllm trains at, so fedllm's
server sends no such meta (the term must not count twice).
"""

from __future__ import annotations

import torch


class _Named:
    """What ``PTFedProxLoss`` reads of a model: ``named_parameters()``, here a chosen list."""

    def __init__(self, pairs: list[tuple[str, torch.Tensor]]):
        self.pairs = pairs

    def named_parameters(self):
        return iter(self.pairs)


class ProximalTerm:
    """mu/2·Σ‖w − w_global‖² over ``model``'s trainable parameters.

    ``start_round(model)`` takes w_global: a detached copy of the trainable tensors as they
    are now. Calling the term before any ``start_round`` is an error. ``mu`` must be > 0 (a
    site with mu = 0 builds no term at all, so it trains bit for bit as under FedAvg).
    """

    def __init__(self, mu: float):
        from nvflare.app_opt.pt.fedproxloss import PTFedProxLoss

        if not mu > 0:
            raise ValueError(f"ProximalTerm mu={mu!r}: expected a number > 0 (mu = 0 is FedAvg: build no term)")
        self.mu = float(mu)
        self.loss = PTFedProxLoss(mu=self.mu)
        self.reference: list[tuple[str, torch.Tensor]] | None = None

    @staticmethod
    def _trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
        return [(name, p) for name, p in model.named_parameters() if p.requires_grad]

    def start_round(self, model: torch.nn.Module) -> None:
        self.reference = [(name, p.detach().clone()) for name, p in self._trainable(model)]

    def __call__(self, model: torch.nn.Module) -> torch.Tensor:
        if self.reference is None:
            raise RuntimeError("ProximalTerm: start_round(model) must take the global weights first")
        live = self._trainable(model)
        if [name for name, _ in live] != [name for name, _ in self.reference]:
            raise RuntimeError("ProximalTerm: the model's trainable parameters changed since start_round")
        return self.loss(_Named(live), _Named(self.reference))
