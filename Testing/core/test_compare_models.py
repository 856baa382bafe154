"""benchmarks/compare_models.py: the paired summary that docs/QUALITY.md's GRPO verdicts quote."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))  # compare_models imports the benchmark's scorer as a sibling
spec = importlib.util.spec_from_file_location("compare_models", BENCHMARKS / "compare_models.py")
compare_models = importlib.util.module_from_spec(spec)
spec.loader.exec_module(compare_models)


def rows(dice, njd):
    return [{"dice": d, "njd": n, "hd95": 3.0} for d, n in zip(dice, njd)]


def test_the_summary_pairs_each_model_with_the_baseline_pair_by_pair(capsys):
    table = {"set": {"no registration": rows([50, 60, 70], [0, 0, 0]),
                     "base, step 3": rows([70, 72, 74], [0.002, 0.004, 0.000]),
                     "tuned, step 3": rows([71, 72.5, 73], [0.001, 0.004, 0.003])}}
    s = compare_models.summarise(table, ["base", "tuned"], 3)["set"]["tuned, step 3"]
    assert s["gain_mean"] == pytest.approx((1 + 0.5 - 1) / 3)
    assert (s["gain_min"], s["gain_max"], s["pairs_gaining"], s["pairs"]) == (-1, 1, 2, 3)
    assert s["njd_gain"] == pytest.approx((-0.001 + 0 + 0.003) / 3)
    low, high = s["gain_ci95"]
    assert -1 <= low < s["gain_mean"] < high <= 1  # pairs disagree: the interval is wide
    assert "tuned, step 3" in capsys.readouterr().out


def test_a_gain_every_pair_shares_has_an_interval_of_that_gain_alone():
    assert compare_models.gain_interval(compare_models.np.full(6, 0.3)) == pytest.approx((0.3, 0.3))
    # the same gains give the same interval on every run (fixed seed)
    gains = compare_models.np.array([0.1, -0.2, 0.4, 0.05, 0.3, -0.1])
    assert compare_models.gain_interval(gains) == compare_models.gain_interval(gains)
