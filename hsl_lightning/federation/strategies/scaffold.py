"""SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated Learning",
ICML 2020, Algorithm 1, option II).

Rule: each local step follows the gradient corrected by control variates, y <- y - lr (g(y) - c_i + c);
after K steps c_i+ = c_i - c + (x - y) / (K lr); the models are averaged and c <- c + mean_i (c_i+ - c_i).
"""

from __future__ import annotations

import torch
from torch import nn

from hsl_lightning.errors import HSLError
from hsl_lightning.federation.strategies.base import Strategy, register


@register
class Scaffold(Strategy):
    """SCAFFOLD (Karimireddy et al., "SCAFFOLD: Stochastic Controlled Averaging for Federated
    Learning", ICML 2020, Algorithm 1 with option II, all nodes every round, global step size 1).

    Node i corrects every local gradient by its control variate: y <- y - lr (g(y) - c_i + c);
    after K local steps, c_i+ = c_i - c + (x - y) / (K lr), where x is the model it received.
    The models are averaged unweighted and c <- c + mean_i (c_i+ - c_i): the control-variate
    deltas ride in the same all-reduce as the weights (so a node sends twice the parameters).
    The correction is applied to the gradient before the module's optimizer step. The update of
    c_i reads the step as plain SGD (y moved by lr times the corrected gradient, K times), so
    SCAFFOLD refuses other optimizers: under AdamW the moved distance is not lr times a gradient,
    and c_i comes out on the wrong scale (about 1,000 times the gradient's in our study's set-up).
    Use ``model.optimizer: sgd`` with ``momentum: 0``, as ``configs/methods/scaffold.yaml`` sets.
    """

    name = "scaffold"
    reads_last_epoch = True  # c_i+ comes from the distance the last epoch's weights moved
    description = "SCAFFOLD (Karimireddy et al. 2020): control variates correct each local gradient for client drift"

    def __init__(self):
        self._c: torch.Tensor | None = None  # the global control variate, identical on every rank
        self._ci: dict[int, torch.Tensor] = {}  # per hosted node
        self._params: list[nn.Parameter] = []
        self._x: torch.Tensor | None = None
        self._correction: list[torch.Tensor] = []

    def _flat(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self._params])

    def extra_size(self, module):
        return sum(p.numel() for p in module.parameters() if p.requires_grad)

    def setup(self, module, num_nodes):
        name, momentum = getattr(module, "optimizer_name", "sgd"), getattr(module, "momentum", 0.0)
        if name != "sgd" or momentum:
            raise HSLError(f"scaffold's control variates assume plain SGD steps, but the model trains with "
                           f"{name}{f' (momentum {momentum})' if momentum else ''}. Set model.init_args.optimizer: sgd "
                           "and momentum: 0 (configs/methods/scaffold.yaml does), or use fedavg / fedprox with an "
                           "adaptive optimizer.")

    def begin_local(self, module, trainee):
        self._params = [p for p in module.parameters() if p.requires_grad]
        self._x = self._flat().clone()
        if self._c is None:
            self._c = torch.zeros_like(self._x)
        ci = self._ci.setdefault(trainee, torch.zeros_like(self._x))
        self._correction = list((self._c - ci).split([p.numel() for p in self._params]))

    def after_backward(self, module):
        for p, corr in zip(self._params, self._correction):
            if p.grad is not None:
                p.grad.add_(corr.view_as(p))

    def end_local(self, module, trainee, steps, optimizer):
        plain = type(optimizer) is torch.optim.SGD and not optimizer.param_groups[0].get("momentum", 0)
        if not plain:
            raise HSLError(f"scaffold needs plain SGD (no momentum); configure_optimizers returned "
                           f"{type(optimizer).__name__}. Return torch.optim.SGD(params, lr, momentum=0).")
        lr = optimizer.param_groups[0]["lr"]
        old = self._ci[trainee]
        new = old - self._c + (self._x - self._flat()) / (max(1, steps) * lr)
        self._ci[trainee] = new
        return (new - old).double()

    def after_round(self, extra_total, num_trainees):
        update = (extra_total / num_trainees).float()
        self._c = update if self._c is None else self._c + update.to(self._c)  # None: this rank hosted no node yet

    def state_dict(self):
        return {"c": self._c, "ci": dict(self._ci)}

    def load_state_dict(self, state):
        self._c, self._ci = state["c"], dict(state["ci"])
