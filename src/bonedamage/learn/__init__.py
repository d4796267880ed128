"""Models, training, architecture search and evaluation (no tracking: see lifecycle)."""
