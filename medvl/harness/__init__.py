"""Harnesses that run models to score them: a VLM under its image controls (shuffled and blank
images, the question-only twin) and a CLIP's zero-shot classification.

They sit above ``generate/`` (they decode) and below ``train/`` (validation during training uses
them); :mod:`medvl.eval` holds the metrics they report, which run no model of medvl's.
"""
