"""What the embedded default run claims, as margins on its summary.json: the default-run tests assert each one, and
benchmarks/seeds.py tabulates them over random streams (seeds stand in for CPU models, whose rounding changes the
stream). A claim is a number computed from the summary and the margin it must exceed."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Claim:
    name: str
    what: str  # how the value is computed, for tables
    value: Callable[[dict], float]
    margin: float

    def check(self, summary: dict) -> tuple[float, bool]:
        """(value, passed): passed when the value exceeds the margin."""
        v = float(self.value(summary))
        return v, v > self.margin


def _stage(summary: dict, stage: str) -> dict:
    return summary["stages"][stage]


def _gain(summary: dict, stage: str, metric: str) -> float:
    m = _stage(summary, stage)
    return m[f"{metric}_after"] - m[f"{metric}_before"]


def _u4g_standard_errors(summary: dict) -> float:
    se = _stage(summary, "u4g")["reward_gain_se"]
    return _gain(summary, "u4g", "reward") / se if se > 0 else float("-inf")


CLAIMS = [
    Claim("pretrain reads captions", "similarity, complete caption - empty caption",
          lambda s: _stage(s, "pretrain")["similarity_complete_caption"]
          - _stage(s, "pretrain")["similarity_empty_caption"], 0.15),
    Claim("cold start keeps the reward", "held-out reward gain", lambda s: _gain(s, "cold_start", "reward"), 0.0),
    Claim("G4U: closer reconstructions", "held-out reward gain", lambda s: _gain(s, "g4u", "reward"), 0.02),
    Claim("G4U: more informative captions", "informativeness gain", lambda s: _gain(s, "g4u", "informativeness"),
          0.05),
    Claim("U4G: closer again", "reward gain / its paired standard error", _u4g_standard_errors, 2.0),
    Claim("Unified-Bench after G4U", "g4u - pretrain (x100)",
          lambda s: s["unified_bench"]["g4u"] - s["unified_bench"]["pretrain"], 10.0),
    Claim("Unified-Bench after U4G", "u4g - pretrain (x100)",
          lambda s: s["unified_bench"]["u4g"] - s["unified_bench"]["pretrain"], 10.0),
]


def check(summary: dict) -> list[tuple[Claim, float, bool]]:
    """Every claim on one run's summary: (claim, value, passed)."""
    return [(c, *c.check(summary)) for c in CLAIMS]
