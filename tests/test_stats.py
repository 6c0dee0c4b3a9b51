"""Means and confidence intervals over seeds (fa_study.stats) against scipy's Student t."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from fa_study.stats import aggregate, format_mean_ci, mean_ci


def test_mean_ci_is_the_student_t_interval():
    v = np.array([1.0, 2.0, 4.0, 7.0])
    m, lo, hi = mean_ci(v)
    half = st.t.ppf(0.975, 3) * v.std(ddof=1) / 2.0
    assert m == pytest.approx(3.5) and lo == pytest.approx(3.5 - half) and hi == pytest.approx(3.5 + half)
    assert math.isnan(mean_ci([5.0])[1]) and mean_ci([5.0])[0] == 5.0
    assert mean_ci([1.0, float("nan"), 3.0])[0] == 2.0  # diverged (NaN) runs are left out


def test_aggregate_formats_mean_pm_ci():
    df = pd.DataFrame({"arm": ["a", "a", "b"], "acc": [0.5, 0.7, 0.9]})
    t = aggregate(df, "arm", ["acc"])
    assert list(t["arm"]) == ["a", "b"] and list(t["n"]) == [2, 1]
    assert t.loc[0, "acc_text"].startswith("0.6000 ± ") and t.loc[1, "acc_text"] == "0.9000"
    assert format_mean_ci(2e-7, 1e-7) == "2e-07 ± 1e-07"


def test_aggregate_counts_only_finite_rows_in_n():
    df = pd.DataFrame({"arm": ["a", "a", "a"], "acc": [0.5, float("nan"), 0.7], "g": [1.0, 2.0, 3.0]})
    t = aggregate(df, "arm", ["acc", "g"])
    assert t.loc[0, "n"] == 2 and t.loc[0, "n_rows"] == 3  # the NaN (diverged) row is not counted
    assert t.loc[0, "acc_n"] == 2 and t.loc[0, "g_n"] == 3
    assert t.loc[0, "acc"] == pytest.approx(0.6) and t.loc[0, "g"] == pytest.approx(2.0)
