"""Strategies: what institutions share after each round and how it is merged, one file per family.

- :mod:`~hsl_lightning.federation.strategies.base`: the :class:`Strategy` base class (every hook a
  strategy may override, documented there), the registry (:data:`STRATEGIES`, :func:`register`)
  and :func:`get_strategy`;
- :mod:`~hsl_lightning.federation.strategies.averaging`: HSL, FedAvg, Swarm, Personalized, Local,
  Central, Foundation;
- :mod:`~hsl_lightning.federation.strategies.proximal`: FedProx, Ditto;
- :mod:`~hsl_lightning.federation.strategies.contrastive`: MOON, FedRCL;
- :mod:`~hsl_lightning.federation.strategies.personal_layers`: FedBN, FedPer, FedRep;
- :mod:`~hsl_lightning.federation.strategies.scaffold`, :mod:`~hsl_lightning.federation.strategies.splitavg`,
  :mod:`~hsl_lightning.federation.strategies.fedcome`: one method each.

Importing this package registers every built-in strategy, in the order of the files imported below
(``hsl strategies`` lists them in that order). A new method is a new file here: a
:class:`Strategy` subclass with the :func:`register` decorator, imported below.
"""

from hsl_lightning.federation.strategies.base import (STRATEGIES, Contribution, Strategy, get_strategy, head_prefixes,
                                                      local_hook, register)
from hsl_lightning.federation.strategies.averaging import (HSL, Central, FedAvg, Foundation, Local, Personalized,
                                                           Swarm)
from hsl_lightning.federation.strategies.proximal import Ditto, FedProx
from hsl_lightning.federation.strategies.contrastive import ACTIVATIONS, FedRCL, Moon, _last_activation
from hsl_lightning.federation.strategies.personal_layers import FedBN, FedPer, FedRep
from hsl_lightning.federation.strategies.scaffold import Scaffold
from hsl_lightning.federation.strategies.splitavg import SplitAVG
from hsl_lightning.federation.strategies.fedcome import FedCOME, consensus_coefficients

__all__ = ["STRATEGIES", "Contribution", "Strategy", "get_strategy", "head_prefixes", "local_hook", "register", "HSL",
           "FedAvg", "Swarm", "Personalized", "Local", "Central", "Foundation", "FedProx", "Ditto", "Moon", "FedRCL",
           "ACTIVATIONS", "FedBN", "FedPer", "FedRep", "Scaffold", "SplitAVG", "FedCOME", "consensus_coefficients"]
