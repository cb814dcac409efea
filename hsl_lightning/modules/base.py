"""Behaviour shared by every binary-task LightningModule of the library.

Subclasses implement ``training_loss(batch)`` and ``primary_logits(batch)``. Evaluation
(``validation_step``/``test_step``) returns the logits and targets, so the Federation can score
each institution itself; under a plain ``lightning.Trainer`` the module also keeps one
:class:`NodeMetrics` per dataloader (= per node) and logs ``node{i}/val_auc`` and friends.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from hsl_lightning.data.sampling import prepare_batch
from hsl_lightning.errors import HSLError
from hsl_lightning.metrics import NodeMetrics

Optimizer = Literal["adamw", "sgd"]


class BinaryTaskModule(L.LightningModule):
    """The LightningModule every model of the package builds on: a binary task's training step, AUC metrics and
    optimizer (AdamW or SGD).

    Args:
        lr: learning rate.
        weight_decay: weight decay (AdamW's decoupled decay; SGD's L2 term).
        optimizer: ``adamw`` or ``sgd`` (SCAFFOLD's correction assumes SGD).
        momentum: SGD's momentum (ignored by AdamW).
        fused_optimizer: run the optimizer as torch's fused kernel, one call for all parameters
            (false: torch's per-parameter loop, as the first studies' cells were computed).
    """

    uses_sat = False  # whether training batches must carry SAT images

    def __init__(self, lr: float = 1e-3, weight_decay: float = 1e-4, optimizer: Optimizer = "adamw",
                 momentum: float = 0.0, fused_optimizer: bool = True):
        super().__init__()
        if optimizer not in ("adamw", "sgd"):
            raise HSLError(f"optimizer must be adamw or sgd, got '{optimizer}'.")
        self.lr, self.weight_decay, self.optimizer_name, self.momentum = lr, weight_decay, optimizer, momentum
        self.fused_optimizer = fused_optimizer
        self._eval_metrics: dict[tuple[str, int], NodeMetrics] = {}

    # --- to implement
    def training_loss(self, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """A training batch's loss and the named terms it is made of (logged), e.g. the SAT's loss."""
        raise NotImplementedError

    def primary_logits(self, batch: dict) -> torch.Tensor:
        """The primary task's logits (B,) of an evaluation batch."""
        raise NotImplementedError

    # --- Lightning hooks
    @property
    def _under_trainer(self) -> bool:
        return self._trainer is not None

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        batch = prepare_batch(batch)  # a batch straight from a training loader: augment it here
        loss, parts = self.training_loss(batch)
        if self._under_trainer:
            self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
            for k, v in parts.items():
                self.log(f"train/{k}", v, batch_size=batch["label"].shape[0])
        return loss

    def _eval_step(self, stage: str, batch: dict, dataloader_idx: int) -> dict[str, torch.Tensor]:
        logits = self.primary_logits(batch)
        target = batch["label"]
        loss = F.binary_cross_entropy_with_logits(logits.float(), target.float())
        if self._under_trainer:
            key = (stage, dataloader_idx)
            self._eval_metrics.setdefault(key, NodeMetrics()).update(logits, target)
        return {"loss": loss, "logits": logits.detach(), "target": target}

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("val", batch, dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0):
        return self._eval_step("test", batch, dataloader_idx)

    def _log_eval(self, stage: str) -> None:
        aucs = []
        for (s, idx), metrics in sorted(self._eval_metrics.items()):
            if s != stage:
                continue
            for name, value in metrics.compute().items():
                if isinstance(value, float):
                    self.log(f"node{idx}/{stage}_{name}", value, add_dataloader_idx=False)
            aucs.append(metrics.compute()["auc"])
            metrics.reset()
        defined = [a for a in aucs if not math.isnan(a)]
        if defined:
            self.log(f"{stage}/mean_auc", sum(defined) / len(defined), prog_bar=True)

    def predict_step(self, batch: dict, batch_idx: int = 0, dataloader_idx: int = 0) -> torch.Tensor:
        """The primary task's probabilities, for ``lightning.Trainer.predict``."""
        return torch.sigmoid(self.primary_logits(batch).float())

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """Probabilities of the primary task's positive class for float images (B, C, H, W) in [0, 1]
        (the module normalises them itself), in eval mode."""
        was_training = self.training
        self.eval()
        try:
            return self.predict_step({"image": images.to(self.device)})
        finally:
            self.train(was_training)

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

    def configure_optimizers(self):
        """AdamW (default) or SGD over the trainable parameters.

        With ``fused_optimizer`` (default) the update runs in torch's fused kernel, one call for all
        parameters: on a 2-core CPU a whole training step at 28 px (ResNet-10t/-18, classifier or
        HSL) takes 14-44 % less time than with torch's default per-parameter loop
        (``benchmarks/optimizer.py``). The arithmetic is the same; results differ from the loop's by
        float rounding only. ``fused_optimizer: false`` keeps torch's default implementation (figures
        recorded before this option reproduce exactly). Where torch has no fused kernel (an older
        torch, an unsupported device) the default is used."""
        params = [p for p in self.parameters() if p.requires_grad]  # frozen parts (a foundation encoder) stay out
        if self.optimizer_name == "sgd":  # plain SGD is what SCAFFOLD's and FedProx's analyses assume
            cls, kwargs = torch.optim.SGD, {"momentum": self.momentum}
        else:
            cls, kwargs = torch.optim.AdamW, {}
        kwargs.update(lr=self.lr, weight_decay=self.weight_decay)
        if self.fused_optimizer and params:
            try:
                return cls(params, fused=True, **kwargs)
            except (RuntimeError, ValueError, TypeError):
                pass  # no fused kernel for these parameters here: torch's default below
        return cls(params, **kwargs)
