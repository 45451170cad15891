"""Paired bootstrap intervals over items and seeds, and the verdict line, against hand-computed cases."""
import numpy as np
import pytest

from bitune_jax.evaluation.stats import Interval, paired_bootstrap, percentile_interval, replicate_means, verdict


def test_replicate_means_by_hand():
    d = np.array([[1.0, 0.0, -1.0], [0.0, 1.0, 1.0]])
    # Replicate 1: seeds 0 and 1 once each, items 0, 0, 1 -> (1 + 1 + 0 + 0 + 0 + 1) / 6 = 0.5.
    # Replicate 2: seed 1 twice, item 2 three times -> 6 * 1 / 6. Replicate 3: all once -> mean(d).
    got = replicate_means(d, np.array([[1, 1], [0, 2], [1, 1]]), np.array([[2, 1, 0], [0, 0, 3], [1, 1, 1]]))
    np.testing.assert_allclose(got, [0.5, 1.0, 2 / 6], rtol=0, atol=1e-12)


def test_percentile_interval_by_hand():
    iv = percentile_interval(np.arange(101.0), 3.5, level=0.9)
    assert iv.estimate == 3.5 and iv.level == 0.9 and iv.low == pytest.approx(5.0) and iv.high == pytest.approx(95.0)
    iv = percentile_interval([0.0, 1.0], 0.5, level=0.5)  # quantiles 0.25, 0.75 interpolated
    assert iv.low == pytest.approx(0.25) and iv.high == pytest.approx(0.75)
    with pytest.raises(ValueError, match="level"):
        percentile_interval([0.0], 0.0, level=1.0)


def test_one_seed_two_items_enumerated():
    # d = [1, 0]: resampled means are 0 (p 1/4), 0.5 (p 1/2), 1 (p 1/4).
    ci = paired_bootstrap({"t": np.array([1, 0])}, n_boot=20_000, seed=1)
    assert ci["t"] == Interval(0.5, 0.0, 1.0, 0.95)
    # The 30% and 70% quantiles both fall on 0.5.
    ci = paired_bootstrap({"t": np.array([1, 0])}, n_boot=20_000, seed=1, level=0.4)
    assert (ci["t"].low, ci["t"].high) == (0.5, 0.5)


def test_two_seeds_two_items_enumerated():
    # d[seed, item] = [[1, 0], [1, 1]]. Seeds drawn (s0 s0 | s0 s1 | s1 s1) with p (1/4, 1/2, 1/4), items likewise:
    #   s0 s0: item means [1, 0]  -> 1, 0.5, 0 with p 1/4, 1/2, 1/4
    #   s0 s1: item means [1, .5] -> 1, 0.75, 0.5
    #   s1 s1: item means [1, 1]  -> 1, 1, 1
    # P(0) = 1/16, P(0.5) = 4/16, P(0.75) = 4/16, P(1) = 7/16: CDF 0.0625, 0.3125, 0.5625, 1.
    d = np.array([[1, 0], [1, 1]])
    ci = paired_bootstrap({"t": d}, n_boot=40_000, seed=2)
    assert ci["t"] == Interval(0.75, 0.0, 1.0, 0.95)  # an items-only bootstrap would give low = 0.5
    ci = paired_bootstrap({"t": d}, n_boot=40_000, seed=2, level=0.5)  # quantiles 0.25 and 0.75
    assert (ci["t"].low, ci["t"].high) == (0.5, 1.0)
    ci = paired_bootstrap({"t": d}, n_boot=40_000, seed=2, level=0.2)  # quantiles 0.4 and 0.6
    assert (ci["t"].low, ci["t"].high) == (0.75, 1.0)


def test_many_items_one_seed_matches_the_normal_interval():
    rng = np.random.default_rng(0)
    d = rng.choice([-1, 0, 1], size=600, p=[0.2, 0.6, 0.2]).astype(float)
    ci = paired_bootstrap({"t": d}, n_boot=20_000, seed=3)["t"]
    half = 1.959964 * d.std() / np.sqrt(d.size)
    assert ci.estimate == pytest.approx(d.mean(), abs=1e-12)
    assert ci.low == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert ci.high == pytest.approx(d.mean() + half, abs=0.1 * half)


def test_average_is_the_unweighted_mean_of_tasks_and_draws_are_deterministic():
    rng = np.random.default_rng(4)
    diffs = {"a": rng.choice([-1, 0, 1], size=(3, 40)), "b": rng.choice([-1, 0, 1], size=(3, 7))}
    ci = paired_bootstrap(diffs, n_boot=3000, seed=5)
    assert set(ci) == {"a", "b", "average"}
    assert ci["average"].estimate == pytest.approx((diffs["a"].mean() + diffs["b"].mean()) / 2, abs=1e-12)
    assert all(iv.low <= iv.estimate <= iv.high for iv in ci.values())
    assert paired_bootstrap(diffs, n_boot=3000, seed=5) == ci
    assert paired_bootstrap(diffs, n_boot=3000, seed=6) != ci
    with pytest.raises(ValueError, match="same seeds"):
        paired_bootstrap({"a": diffs["a"], "b": diffs["b"][:2]})
    with pytest.raises(ValueError, match="no tasks"):
        paired_bootstrap({})


def test_verdict_positive_negative_inconclusive():
    pos = verdict(Interval(0.031, 0.012, 0.05), context="3 tasks, 3 seeds, acc")
    assert pos == ("Bitune beats LoRA: Bitune - LoRA = +3.1 points, 95% interval [+1.2, +5.0] "
                   "(3 tasks, 3 seeds, acc), above 0.")
    neg = verdict(Interval(-0.04, -0.07, -0.01))
    assert neg == "LoRA beats Bitune: Bitune - LoRA = -4.0 points, 95% interval [-7.0, -1.0], below 0."
    inc = verdict(Interval(0.01, -0.02, 0.04))
    assert inc.startswith("Inconclusive: Bitune - LoRA = +1.0 points, 95% interval [-2.0, +4.0] contains 0;")
    assert "beats" not in inc and "below -2.0 or above +4.0" in inc
    # An interval that touches 0 shows nothing either; names are the caller's.
    assert verdict(Interval(0.02, 0.0, 0.04)).startswith("Inconclusive")
    assert verdict(Interval(0.02, 0.01, 0.04), first="Bitune (alpha 0)").startswith("Bitune (alpha 0) beats LoRA")
    assert all("\n" not in line for line in (pos, neg, inc))
