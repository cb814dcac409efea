"""Using what a run trained: its checkpoints, scoring on any data (``hsl test``), predictions (``hsl predict``),
two runs compared (``hsl compare``)."""
