"""The default run's claims (uae_lightning.toy_claims), computed on a summary worked by hand."""
import math

from uae_lightning.toy_claims import CLAIMS, check


def summary(u4g_se: float = 0.002) -> dict:
    return {"stages": {"pretrain": {"similarity_complete_caption": 0.60, "similarity_empty_caption": 0.44},
                       "cold_start": {"reward_before": 0.19, "reward_after": 0.20},
                       "g4u": {"reward_before": 0.20, "reward_after": 0.23, "informativeness_before": 0.20,
                               "informativeness_after": 0.24},
                       "u4g": {"reward_before": 0.480, "reward_after": 0.485, "reward_gain_se": u4g_se}},
            "unified_bench": {"pretrain": 17.0, "g4u": 27.5, "u4g": 26.0}}


def test_each_claim_is_its_value_against_its_margin():
    got = {c.name: (v, ok) for c, v, ok in check(summary())}
    assert list(got) == [c.name for c in CLAIMS]
    expected = {"pretrain reads captions": (0.16, True),      # 0.60 - 0.44 > 0.15
                "cold start keeps the reward": (0.01, True),   # 0.20 - 0.19 > 0
                "G4U: closer reconstructions": (0.03, True),   # 0.23 - 0.20 > 0.02
                "G4U: more informative captions": (0.04, False),  # 0.24 - 0.20 is not > 0.05
                "U4G: closer again": (2.5, True),              # 0.005 / 0.002 > 2
                "Unified-Bench after G4U": (10.5, True),       # 27.5 - 17.0 > 10
                "Unified-Bench after U4G": (9.0, False)}       # 26.0 - 17.0 is not > 10
    for name, (value, ok) in expected.items():
        assert math.isclose(got[name][0], value, abs_tol=1e-9) and got[name][1] == ok, (name, got[name])


def test_a_cold_start_that_lowers_the_reward_does_not_keep_it():
    s = summary()
    s["stages"]["cold_start"]["reward_after"] = 0.185
    [(_, value, ok)] = [r for r in check(s) if r[0].name == "cold start keeps the reward"]
    assert math.isclose(value, -0.005, abs_tol=1e-9) and not ok


def test_a_u4g_gain_without_a_standard_error_is_not_a_claim_that_holds():
    [(_, value, ok)] = [r for r in check(summary(u4g_se=0.0)) if r[0].name == "U4G: closer again"]
    assert value == -math.inf and not ok
