"""The trainer layer: recipes (one per paradigm), typed configs, distribution, checkpoints."""
