"""Float64 twins of the modules, for comparisons of runs that take different float paths
(tests/test_fused.py), and the tolerances those comparisons use."""

import torch
import torch.nn.functional as F

from hsl_lightning import ClassifierModule, HSLModule

# Runs that must agree but take different float paths (fused training runs a grouped convolution
# where one-by-one training runs N plain ones; one rank and two add contributions in another
# order) agree up to float rounding, which training amplifies: in float32 a train loss came out
# 1.5e-5 apart on one 2-core machine, and a node's test AUC one pair of images apart on another.
# So such comparisons compute in float64 end to end, loss included (Classifier64, HSL64 below):
# float64 rounding (u = 1.1e-16), even amplified a million-fold by a test's few dozen steps, stays
# under TOLERANCE for weights and AUCs. A reported train loss is an epoch's step losses summed in
# float32 by the Federation, which the two paths reach by different casts (one rounding more when
# fused): at most 2 float32 roundings (2^-24 each) per step of at most 5 steps, relative to a loss
# under 1, hence LOSS_TOLERANCE. The errors these comparisons guard against (a trainee taking one
# step more or less, an idle step reaching a trainee, another batch, another epoch's state or loss)
# move weights and losses by 1e-4 or more. Measured here (2-core machine, 2026-11-29): weights within
# 1e-14, losses within 6e-8 (the float32 runs they replace: 1.5e-5 apart on another machine).
TOLERANCE = 1e-9
LOSS_TOLERANCE = 1e-6


def _float64(batch: dict) -> dict:
    return {k: v.double() if torch.is_floating_point(v) else v for k, v in batch.items()}


class Classifier64(ClassifierModule):
    """The classifier in float64 (convert it with .double()): batches cast on the way in, loss in float64."""

    def training_loss(self, batch):
        return F.binary_cross_entropy_with_logits(self(batch["image"].double()), batch["label"].double()), {}

    def primary_logits(self, batch):
        return self(batch["image"].double())


class HSL64(HSLModule):
    """HSLModule in float64 (convert it with .double()): its training loss with both BCE terms in float64."""

    def training_loss(self, batch):
        batch = _float64(batch)
        out = self.net(batch["image"], batch["sat_image"])
        primary = F.binary_cross_entropy_with_logits(out.primary_logit, batch["label"].double())
        sat = F.binary_cross_entropy_with_logits(out.sat_logit, batch["sat_label"].double())
        return self.primary_weight * primary + self.sat_weight * sat, {}

    def primary_logits(self, batch, *args, **kwargs):
        return super().primary_logits(_float64(batch), *args, **kwargs)


