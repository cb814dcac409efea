import lightning as L
import pytest
import torch

from hsl_lightning import ClassifierModule, HSLError

from conftest import tiny_data, tiny_hsl


def trainer():
    return L.Trainer(max_epochs=1, limit_train_batches=2, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")


@pytest.mark.parametrize("make", [tiny_hsl, lambda: ClassifierModule(backbone="test_resnet")], ids=["hsl", "classifier"])
def test_modules_train_and_validate_with_a_plain_trainer(make):
    t = trainer()
    model = make()
    t.fit(model, datamodule=tiny_data())
    metrics = t.callback_metrics
    for i in range(3):
        assert 0.0 <= float(metrics[f"node{i}/val_auc"]) <= 1.0
    assert "val/mean_auc" in metrics and "train/loss" in metrics


def test_hsl_loss_is_the_weighted_sum_of_both_tasks():
    torch.manual_seed(0)
    model = tiny_hsl(primary_weight=0.3, sat_weight=0.7).eval()
    batch = next(iter(tiny_data().train_loader([0], seed=0)))
    loss, parts = model.training_loss(batch)
    assert torch.allclose(loss, 0.3 * parts["primary_loss"] + 0.7 * parts["sat_loss"])


def test_sat_inference_policies_feed_the_sat_branch_as_documented():
    torch.manual_seed(0)
    dm = tiny_data()
    # A low temperature makes the shared embedding peaked, so the SAT input visibly moves the logit.
    model = tiny_hsl(temperature=0.05).eval()
    batch = next(iter(dm.eval_loader(0, "test")))
    with pytest.raises(HSLError, match="set_sat_reference"):
        model.primary_logits(batch, "reference")
    reference = dm.sat_reference(16)
    model.set_sat_reference(reference)
    with torch.no_grad():
        out = {p: model.primary_logits(batch, p) for p in ("primary", "reference", "paired")}
        image = batch["image"]
        assert torch.allclose(out["primary"], model.net(image, image).primary_logit)
        assert torch.allclose(out["paired"], model.net(image, batch["sat_image"]).primary_logit)
        mean_feature = model.net.sat_features(reference).mean(0, keepdim=True)
        assert torch.allclose(out["reference"], model.net(image, sat_feature=mean_feature).primary_logit, atol=1e-6)
        assert not torch.allclose(out["primary"], out["paired"])
        # 'reference' does not depend on which other images share the batch
        half = {k: v[:5] for k, v in batch.items()}
        assert torch.allclose(model.primary_logits(half, "reference"), out["reference"][:5], atol=1e-5)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_fused_optimizer_takes_the_same_steps_as_torchs_default(optimizer):
    """The fused kernel (default) and torch's per-parameter loop: same updates up to float rounding."""
    dm = tiny_data()
    batches = [b for _, b in zip(range(3), dm.train_loader([0], seed=0, with_sat=False))]
    states = {}
    for fused in (True, False):
        torch.manual_seed(0)
        model = ClassifierModule(backbone="test_resnet", optimizer=optimizer, momentum=0.9, lr=0.01,
                                 fused_optimizer=fused)
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        opt = model.configure_optimizers()
        assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[optimizer]
        assert bool(opt.defaults.get("fused")) is fused
        assert opt.defaults["lr"] == 0.01 and opt.defaults["weight_decay"] == 1e-4
        model.train()
        for i, batch in enumerate(batches):
            opt.zero_grad()
            model.training_step(batch, i).backward()
            opt.step()
        states[fused] = model.state_dict()
    for k, v in states[False].items():
        assert torch.allclose(states[True][k].double(), v.double(), rtol=1e-4, atol=1e-5), k
    # the comparison is between trained models, not two copies of the initial one
    assert not torch.equal(states[False]["head.1.weight"], initial["head.1.weight"])


def test_fused_optimizer_falls_back_where_torch_has_no_fused_kernel(monkeypatch):
    class NoFused(torch.optim.AdamW):
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of "
                                   "supported devices")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    opt = ClassifierModule(backbone="test_resnet").configure_optimizers()
    assert isinstance(opt, NoFused) and not opt.defaults.get("fused")
