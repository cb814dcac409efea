"""Training across real hospitals on Flower's deployment engine (the ``flower`` extra).

- :mod:`~hsl_lightning.flower.site`: one hospital's side (its data, local training, state), the
  simulator's own code run as one rank of the federation;
- :mod:`~hsl_lightning.flower.server`: the server's side, ``hsl fit``'s round loop whose sites are
  far away (merge, quorum, patience, the deployed round, checkpoints, ``summary.json``);
- :mod:`~hsl_lightning.flower.app`: the Flower ServerApp and ClientApp that carry the two sides'
  messages over a SuperLink and SuperNodes (TLS, node authentication);
- :mod:`~hsl_lightning.flower.worker`: a site's long-lived process, so that a site pays for its
  imports and its data once per run, not once per Flower message;
- :mod:`~hsl_lightning.flower.keys`: certificates and node keys for a deployment.

Only ``app`` imports Flower itself; the rest runs (and is tested) without a SuperLink.
"""
