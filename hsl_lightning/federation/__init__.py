"""Federation: the Fabric orchestrator, strategies and synchronisation."""

from hsl_lightning.federation.federation import Federation, format_table
from hsl_lightning.federation.strategies import STRATEGIES, Strategy, get_strategy

__all__ = ["Federation", "format_table", "STRATEGIES", "Strategy", "get_strategy"]
