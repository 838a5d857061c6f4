"""Losses: contrastive (CLIP, SigLIP) and distillation (feature, MMKD-CLIP)."""
