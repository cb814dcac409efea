"""How alike the institutions look through a trained model: the paper's homogenisation view.

For each run, every node's test images go through the model that node deploys, and the module's
``representation`` (HSLModule: the projected primary feature; ClassifierModule: the pooled backbone
feature) is kept. Two numbers say how far the nodes' feature distributions are apart:

- **node separability**: balanced accuracy of a linear probe (logistic regression on standardised
  features, stratified k-fold cross-validation) that guesses the node from the feature; 1/N is
  chance (the nodes look alike), 1 means every node is told apart;
- **MMD**: the mean over node pairs of the squared maximum mean discrepancy (biased estimate) with a
  Gaussian kernel exp(-d^2 / m), m the median squared distance between all features of the run.

A t-SNE map per run, coloured by node, draws the same thing. Needs the ``analysis`` extra
(scikit-learn, matplotlib).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from hsl_lightning.config import HSLCLI
from hsl_lightning.inference import checkpoints
from hsl_lightning.errors import HSLError


@dataclass
class Features:
    """One run's image features: a row per image, with the node each image came from."""
    run: str  # a label for the run (its strategy by default)
    features: np.ndarray  # (n, d)
    nodes: np.ndarray  # (n,) node index
    names: list[str]  # node names


def _analysis_imports():
    try:
        import matplotlib  # noqa: F401
        import sklearn  # noqa: F401
    except ImportError as exc:
        raise HSLError(f"The homogeneity analysis needs scikit-learn and matplotlib ({exc.name} is missing): "
                       "pip install 'hsl_lightning[analysis]'.") from exc


def deployed_state(run_dir: Path, node: str) -> dict[str, torch.Tensor]:
    """The weights ``node`` deploys in a finished run: ``model.ckpt`` when all nodes deploy one
    model, else ``nodes/<node>.ckpt``."""
    models = checkpoints.deployed(run_dir)
    path = models.get(None) or models.get(node)
    if path is None:
        raise HSLError(f"{run_dir} holds no weights for node '{node}' (nodes/{node}.ckpt); it deployed models for "
                       f"{', '.join(models)}.")
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def extract(run_dir: str | Path, split: str = "test", label: str | None = None) -> Features:
    """Every node's ``split`` features through its deployed model, rebuilt from the run's config.yaml."""
    run_dir = Path(run_dir)
    config = run_dir / "config.yaml"
    if not config.is_file():
        raise HSLError(f"{config} not found: pass the directory of a finished `hsl fit` run.")
    cli = HSLCLI(run=False, args=["--config", str(config), "--federation.wandb", "disabled"])
    module, dm = cli.model, cli.datamodule
    if not hasattr(module, "representation"):
        raise HSLError(f"{type(module).__name__} has no representation(batch); the analysis needs one.")
    dm.setup("fit")
    if getattr(module, "uses_sat", False) and hasattr(module, "set_sat_reference"):
        module.set_sat_reference(dm.sat_reference())
    feats, nodes = [], []
    for i, name in enumerate(dm.node_names):
        module.load_state_dict(deployed_state(run_dir, name), strict=True)
        module.eval()
        with torch.no_grad():
            for batch in dm.eval_loader(i, split):
                feats.append(module.representation(batch).float().cpu())
                nodes.append(torch.full((batch["image"].shape[0],), i))
    strategy = cli.trainer.strategy.name
    return Features(label or strategy, torch.cat(feats).numpy(), torch.cat(nodes).numpy(), list(dm.node_names))


def node_separability(features: np.ndarray, nodes: np.ndarray, folds: int = 5, seed: int = 0) -> float:
    """Cross-validated balanced accuracy of a linear probe predicting the node (chance: 1 / nodes)."""
    _analysis_imports()
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(nodes)
    folds = int(min(folds, counts[counts > 0].min()))
    if folds < 2:
        raise HSLError("node separability needs at least 2 test images per node.")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(folds, shuffle=True, random_state=seed)
    guess = cross_val_predict(probe, features, nodes, cv=cv)
    return float(balanced_accuracy_score(nodes, guess))


def mean_pairwise_mmd(features: np.ndarray, nodes: np.ndarray) -> float:
    """Mean over node pairs of the biased squared MMD, kernel exp(-d^2 / median squared distance)."""
    x = torch.as_tensor(features, dtype=torch.float64)
    d2 = torch.cdist(x, x).pow(2)
    bandwidth2 = d2[d2 > 0].median() if (d2 > 0).any() else torch.tensor(1.0, dtype=torch.float64)
    k = torch.exp(-d2 / bandwidth2)
    ids = torch.as_tensor(nodes)
    values = []
    for a, b in itertools.combinations(sorted(set(nodes.tolist())), 2):
        ia, ib = ids == a, ids == b
        values.append(float(k[ia][:, ia].mean() + k[ib][:, ib].mean() - 2 * k[ia][:, ib].mean()))
    return float(np.mean(values)) if values else 0.0


def homogeneity(f: Features) -> dict:
    """How separable the nodes' features are (a linear probe's balanced accuracy, against chance) and their mean
    pairwise MMD."""
    return {"run": f.run, "nodes": len(f.names), "images": int(len(f.nodes)),
            "node_separability": node_separability(f.features, f.nodes), "chance": 1 / len(f.names),
            "mmd": mean_pairwise_mmd(f.features, f.nodes)}


def tsne_figure(runs: list[Features], seed: int = 0):
    """One t-SNE panel per run, points coloured by node."""
    _analysis_imports()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.manifold import TSNE

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False)
    for ax, f in zip(axes[0], runs):
        perplexity = float(max(2, min(30, (len(f.nodes) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(f.features)
        for i, name in enumerate(f.names):
            m = f.nodes == i
            ax.scatter(xy[m, 0], xy[m, 1], s=8, alpha=0.7, label=name)
        ax.set_title(f.run)
        ax.set_xticks([]), ax.set_yticks([])
    axes[0][-1].legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    return fig


def embed(run_dirs: list[str | Path], out: str | Path, labels: list[str] | None = None, split: str = "test",
          seed: int = 0) -> list[dict]:
    """Features of each run, their homogeneity numbers and a t-SNE figure (``out``: a .png path)."""
    _analysis_imports()
    labels = labels or [None] * len(run_dirs)
    runs = [extract(d, split, label) for d, label in zip(run_dirs, labels)]
    rows = [homogeneity(f) for f in runs]
    fig = tsne_figure(runs, seed)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    return rows
