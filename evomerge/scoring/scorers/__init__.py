"""Scorer backends, one file each, registered lazily by name in :data:`evomerge.scoring.base.SCORERS`."""
