"""Unified-Bench: how well a unified model's captions let its own decoder redraw the image (bench/core.py)."""
from uae_lightning.bench.core import DEFAULT_BACKBONES, Scorer, format_summary, run_bench, score_folders

__all__ = ["DEFAULT_BACKBONES", "Scorer", "format_summary", "run_bench", "score_folders"]
