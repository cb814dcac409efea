"""Federation: the Fabric orchestrator (its round loop and phases), strategies and synchronisation."""

from hsl_lightning.federation.federation import Federation
from hsl_lightning.federation.reporting import format_table
from hsl_lightning.federation.strategies import STRATEGIES, Strategy, get_strategy, register

__all__ = ["Federation", "format_table", "STRATEGIES", "Strategy", "get_strategy", "register"]
