"""The study's statistics (study/stats.py): the paired, seed-hierarchical bootstrap covers a known difference and
narrows as 1/sqrt(n), pairing and seeds do what they should; the paper's predictions and conditions are decided
from the intervals of their differences; MMD² differences, retention along a curve, correlations, mean ± std."""
import numpy as np
import pytest

from study.stats import (_ranks, along, conditions, correlation, equivalence, frontier, holm, multiplicity,
                         predictions, replicate_interval, state_sources, studentized, t_quantile, t_two_sided,
                         verdict)
from study.stages import stages
from study.summary import mean_std


def bootstrap(scores: dict, statistic, resamples: int = 2000, seed: int = 0, paired: bool = True) -> dict:
    """A 95% percentile interval of statistic(means), resampling items and seeds with replacement (hierarchical):
    the study's first construction (study/stats.py until issue 29), kept here as the reference `studentized`
    is measured against (it undercovers).

    scores: {model: {task: [seeds, items] array}}; every model's rows of one task score the same items in the
    same order. Each resample draws, per task, as many items as there are, with replacement: one draw shared
    by all models when `paired`, so that how hard an item is cancels out of a difference between models,
    and one draw per model otherwise. It also draws S of a model's S seeds with replacement, the same seed
    indices for every model that has S (seed s of a student and seed s of its teacher stay together), so the
    interval covers seed-to-seed spread as well as item sampling; a model with one row (the base: greedy
    decoding is deterministic) keeps it. statistic({model: {task: [R] means}}) -> [R] array.
    Returns {estimate (on all items and seeds), ci95, std, resamples}."""
    rng = np.random.default_rng(seed)

    def draw(n):   # [resamples, n]: how often each of n items is drawn in each resample
        return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)

    n_items = {t: X.shape[1] for m in scores.values() for t, X in m.items()}
    shared = {t: draw(n) for t, n in n_items.items()} if paired else {}
    counts = {(name, t): shared[t] if paired else draw(n_items[t]) for name, m in scores.items() for t in m}
    seed_draws = {S: rng.integers(0, S, (resamples, S)) for S in sorted({len(X) for m in scores.values() for X in m.values()})
                  if S > 1}

    def means(weights, seeds):
        out = {}
        for name, m in scores.items():
            out[name] = {}
            for t, X in m.items():
                per_seed = X @ weights(name, t).T / X.shape[1]     # [S, R]: each seed's mean on each resample's items
                rows = seeds.get(len(X))
                out[name][t] = per_seed.mean(0) if rows is None else np.take_along_axis(per_seed, rows.T, 0).mean(0)
        return out

    boot = np.asarray(statistic(means(lambda name, t: counts[name, t], seed_draws)), dtype=float)
    estimate = float(np.asarray(statistic(means(lambda name, t: np.ones((1, n_items[t])), {})), dtype=float)[0])
    boot = boot[np.isfinite(boot)]
    if not len(boot):
        return {"estimate": estimate, "ci95": [float("nan")] * 2, "std": float("nan"), "resamples": resamples}
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"estimate": estimate, "ci95": [float(lo), float(hi)], "std": float(boot.std(ddof=1)),
            "resamples": resamples}


def difference(a, b):
    return lambda m: m[a]["t"] - m[b]["t"]


def test_bootstrap_interval_covers_a_known_difference_and_narrows_with_n():
    rng = np.random.default_rng(0)
    covered, widths = 0, {}
    for trial in range(40):
        for n in (200, 800):
            a, b = (rng.random(n) < 0.6).astype(float), (rng.random(n) < 0.5).astype(float)   # true difference 0.1
            iv = bootstrap({"a": {"t": a[None]}, "b": {"t": b[None]}}, difference("a", "b"), resamples=500, seed=trial)
            assert iv["ci95"][0] <= iv["estimate"] <= iv["ci95"][1]
            assert iv["estimate"] == pytest.approx(a.mean() - b.mean())
            widths.setdefault(n, []).append(iv["ci95"][1] - iv["ci95"][0])
            covered += n == 800 and iv["ci95"][0] <= 0.1 <= iv["ci95"][1]
    assert covered >= 34                                   # nominal 95% of 40: 38
    assert np.mean(widths[800]) == pytest.approx(np.mean(widths[200]) / 2, rel=0.15)   # width ~ 1 / sqrt(n)


def test_paired_interval_is_narrower_than_unpaired_on_correlated_items():
    rng = np.random.default_rng(1)
    easy = rng.random(500) < 0.5                       # how hard an item is decides most of both models' answers
    a = (easy | (rng.random(500) < 0.1)).astype(float)
    b = (easy & (rng.random(500) < 0.95)).astype(float)
    scores = {"a": {"t": a[None]}, "b": {"t": b[None]}}
    paired = bootstrap(scores, difference("a", "b"), resamples=1000)
    unpaired = bootstrap(scores, difference("a", "b"), resamples=1000, paired=False)
    assert paired["estimate"] == unpaired["estimate"]
    assert paired["std"] < unpaired["std"] / 2
    assert verdict(paired) == "holds" and verdict(paired, -1) == "contradicted"


def test_hierarchical_bootstrap_widens_with_seed_to_seed_spread():
    rng = np.random.default_rng(2)
    base = (rng.random(400) < 0.5).astype(float)[None]
    same = np.repeat((rng.random(400) < 0.55).astype(float)[None], 3, 0)                  # three identical seeds
    spread = np.stack([(rng.random(400) < p).astype(float) for p in (0.40, 0.55, 0.70)])   # seeds far apart
    narrow = bootstrap({"base": {"t": base}, "m": {"t": same}}, difference("m", "base"), resamples=1000)
    wide = bootstrap({"base": {"t": base}, "m": {"t": spread}}, difference("m", "base"), resamples=1000)
    assert wide["std"] > 1.5 * narrow["std"]
    assert verdict({"ci95": [-0.01, 0.02]}) == "undecided"


def synthetic_study(rng, seeds, n=500, gain=0.6, spread=0.2):
    """A base (one deterministic row) and a trained model's [seeds, n] answers on the same n items: item i's chance
    p_i ~ Beta(0.3, 0.3) (most items always right or always wrong, as in the study), and the model turns a fraction
    c_s ~ N(gain, spread) of every item's wrong chance right, c_s drawn per seed. The true difference is
    gain x E[1 - p] = gain / 2; the seeds' spread of the mean (0.1) is stress SFT's MMLU spread in tiny/results-world2
    (0.05) doubled, the item noise of the difference about 0.02, lm-eval's standard error at 500 items."""
    p = rng.beta(0.3, 0.3, n)
    c = np.clip(rng.normal(gain, spread, (seeds, 1)), 0, 1)
    base = (rng.random((1, n)) < p).astype(float)
    return {"base": {"t": base}, "m": {"t": (rng.random((seeds, n)) < p + c * (1 - p)).astype(float)}}


def test_student_t_tails_and_quantiles():
    assert t_quantile(0.95, 2) == pytest.approx(4.3027, abs=1e-4) and t_quantile(0.95, 5) == pytest.approx(2.5706, abs=1e-4)
    assert t_two_sided(2.0, 1) == pytest.approx(1 - 2 * np.arctan(2.0) / np.pi)
    assert t_two_sided(1.959964, 10 ** 6) == pytest.approx(0.05, abs=1e-6)


def test_studentized_interval_covers_at_three_and_five_seeds_where_the_bootstrap_does_not():
    """300 synthetic studies per seed count. Measured (this seed): studentized 94.7% at S = 3, 97.3% at S = 5, 97.0%
    at S = 10; the percentile bootstrap over items and seeds (study.stats.bootstrap) 75.7%, 89.7% and 94.7%."""
    covered = {}
    for S in (3, 5):
        rng = np.random.default_rng(S)
        for k in range(300):
            study = synthetic_study(rng, S)
            for name, f in (("old", bootstrap), ("new", studentized)):
                lo, hi = f(study, difference("m", "base"), resamples=300, seed=k)["ci95"]
                covered[name, S] = covered.get((name, S), 0) + (lo <= 0.3 <= hi) / 300
    assert covered["new", 3] >= 0.93 and covered["new", 5] >= 0.93
    assert covered["old", 3] < 0.85 and covered["old", 5] < covered["new", 5] - 0.03


def regime_coverage(spread, studies=1500, seed=0):
    """Coverage of `studentized` over synthetic 3-seed studies whose seeds' effect has std spread / 2: the share of
    95% intervals that cover the true difference, the mean of u = P(|T| < |t at the truth|) (the lowest level whose
    interval covers it: uniform for an exact interval, so its mean, the miss rate averaged over all levels, is 0.5;
    below 0.5 the intervals are wider than they need be at every level), the median degrees of freedom and the median
    std of the per-seed differences."""
    rng, cover, u, df, sd = np.random.default_rng(seed), 0, [], [], []
    for k in range(studies):
        study = synthetic_study(rng, 3, spread=spread)
        iv = studentized(study, difference("m", "base"), resamples=200, seed=k)
        cover += iv["ci95"][0] <= 0.3 <= iv["ci95"][1]
        u.append(1 - t_two_sided((iv["estimate"] - 0.3) / iv["std"], iv["df"]))
        df.append(iv["df"])
        sd.append(np.std(study["m"]["t"].mean(1), ddof=1))
    return cover / studies, float(np.mean(u)), float(np.median(df)), float(np.median(sd))


def test_studentized_interval_covers_where_the_seeds_lead_and_where_the_items_do():
    """Both regimes, 1,500 three-seed studies each (about 25 s on one thread): the seeds leading (spread 0.2:
    per-seed std 0.083, t with S - 1 = 2 df) and the committed study's own regime, the items leading with a seed
    spread of about 0.02 (spread 0.03: per-seed std 0.018, Satterthwaite's df 39 in the median; 58 of Table 2's 60
    intervals in tiny/results-world2 have Satterthwaite's df, 8.7 to 819).

    In each regime the 95% interval covers at least 94% (its level less the simulation's noise: the binomial std at
    1,500 studies is 0.56 points), and mean u lies within [0.44, 0.52]: a little conservative at most (the item x
    seed interaction is counted in both parts, `studentized`'s docstring), never short. Measured with this seed,
    coverage and u: seeds leading 95.6%, 0.483; items leading 96.7%, 0.462. With one variance part of
    `seed_interval` scaled (study/stats.py edited by hand, this test run, the edit reverted):
    - the items' part halved: items leading 92.9%, 0.522: fails (seeds leading 95.5%, 0.494);
    - doubled: items leading 99.3%, 0.384: fails (seeds leading 95.5%, 0.467);
    - the seeds' part halved: seeds leading 91.3%, 0.558: fails (items leading 95.4%, 0.490);
    - doubled: seeds leading 97.2%, 0.407, and items leading 97.8%, 0.419: fails in both.
    A part that does not lead is too small for coverage to see it scaled by 2 (halving it moves the SE by a few
    percent): each part is tested where it leads, which is why both regimes are simulated. The bounds sit between
    the measured values and the perturbed ones: the correct interval is 1.6 and 2.7 points (2.8 and 4.7 std) above
    the coverage floor, and 0.022 (2.9 std of mean u) above u's floor where the items lead."""
    seeds_lead, items_lead = regime_coverage(0.2), regime_coverage(0.03)
    assert seeds_lead[2] == 2 and 0.07 < seeds_lead[3]                                # t with S - 1 df
    assert 11 <= items_lead[2] <= 819 and 0.015 < items_lead[3] < 0.025             # Satterthwaite's, seeds ~0.02
    for cover, u, _, _ in (seeds_lead, items_lead):
        assert cover >= 0.94 and 0.44 <= u <= 0.52


def test_studentized_interval_is_the_t_interval_when_seeds_dominate_and_the_normal_when_they_agree():
    rng = np.random.default_rng(3)
    base = (rng.random(400) < 0.5).astype(float)[None]
    shifted = np.stack([np.where(rng.random(400) < q, 1.0, base[0]) for q in (0.1, 0.3, 0.5)])   # seeds far apart
    iv = studentized({"base": {"t": base}, "m": {"t": shifted}}, difference("m", "base"))
    per_seed = (shifted - base).mean(1)
    assert iv["df"] == 2 and iv["std"] >= per_seed.std(ddof=1) / np.sqrt(3)
    assert iv["ci95"][1] - iv["estimate"] == pytest.approx(4.3027 * iv["std"], rel=1e-3)
    same = studentized({"base": {"t": base}, "m": {"t": np.repeat(shifted[:1], 3, 0)}}, difference("m", "base"))
    assert same["df"] > 300 and same["ci95"][1] - same["estimate"] == pytest.approx(1.97 * same["std"], rel=0.01)
    for v in (iv, same):   # the p-value is the same t-test's: under 5% exactly when the 95% interval excludes zero
        assert v["p"] == pytest.approx(t_two_sided(v["estimate"] / v["std"], v["df"]))
        assert (v["p"] < 0.05) == (v["ci95"][0] > 0)


def test_equivalence_by_two_one_sided_tests():
    iv = {"estimate": 0.01, "std": 0.002, "df": 50, "ci90": [0.0066, 0.0134], "ci95": [0.006, 0.014]}
    assert equivalence(iv, 0.025)[0] == "equivalent" and verdict(iv) == "holds"   # precise, small and nonzero
    assert equivalence(iv, 0.005)[0] == "different"
    wide = {"estimate": 0.01, "std": 0.02, "df": 50, "ci90": [-0.024, 0.044], "ci95": [-0.03, 0.05]}
    assert equivalence(wide, 0.025)[0] == "undecided"
    # "different" is |difference| > margin tested two-sided: p under 5% exactly when the 95% interval lies beyond
    # the margin, as Holm's raw rule (p < 0.05) needs; a one-sided p would be half of it
    h95, h90 = (t_quantile(level, 50) * 0.002 for level in (0.95, 0.90))
    exact = {"estimate": 0.01, "std": 0.002, "df": 50,
             "ci90": [0.01 - h90, 0.01 + h90], "ci95": [0.01 - h95, 0.01 + h95]}
    beyond, p = equivalence(exact, 0.01 - h95 - 1e-5)
    assert beyond == "different" and 0.045 < p < 0.05
    assert equivalence(exact, 0.01 - h95 + 1e-5)[0] == "undecided"


def test_holm_adjusts_known_p_values():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2]) == [0.2] and holm([0.5, 0.5]) == [1.0, 1.0]


def run_scores(base, rng, gain=0.0, loss=0.0, seeds=3):
    """Per task [seeds, n]: the base's answers, with a fraction `gain` of its wrong GSM8K answers turned right
    and a fraction `loss` of its right retention answers turned wrong, drawn anew for each seed."""
    out = {}
    for task, X in base.items():
        rows = []
        for _ in range(seeds):
            x = X[0].copy()
            if task == "gsm8k":
                x[(x == 0) & (rng.random(len(x)) < gain)] = 1
            else:
                x[(x > 0.5) & (rng.random(len(x)) < loss)] = 0
            rows.append(x)
        out[task] = np.stack(rows)
    return out


def kl_measure(values_per_prompt):
    return [{"value": float(np.mean(v)), "per_prompt": list(v)} for v in values_per_prompt]


def test_predictions_are_decided_from_intervals_of_their_differences():
    rng = np.random.default_rng(0)
    n = 800
    base = {t: (rng.random(n) < p).astype(float)[None] for t, p in
            (("gsm8k", 0.4), ("truthfulqa", 0.9), ("truthfulqa_mc2", 0.8), ("mmlu", 0.85))}
    scores = {"base": base, "sft_mild": run_scores(base, rng, gain=0.15), "sft_stress": run_scores(base, rng, loss=0.15),
              "grpo": run_scores(base, rng, gain=0.05), "opd_stress": run_scores(base, rng, gain=0.1, loss=0.01)}
    stress_kl = rng.random((3, 64)) * 0.2
    measures = {"sft_stress": {"kl_base_policy_target": kl_measure(stress_kl)},
                "opd_stress": {"kl_base_policy_target": kl_measure(stress_kl + rng.normal(0, 0.001, (3, 64)))}}
    p = predictions(scores, measures)
    assert [p[k]["verdict"] for k in ("P1", "P2", "P3", "P4 kl_base_policy_target")] == ["holds"] * 4
    assert p["P4 kl_base_policy_target"]["similar"]
    assert all(q["interval"]["ci95"][0] > 0 for k in ("P1", "P2", "P3") for q in p[k]["parts"])
    # A teacher below the base on the target and an OPD run that only kept the base's answers: above its teacher,
    # not above the base, so P3 is not decided (the second world's case).
    teacher = dict(scores["sft_stress"], gsm8k=scores["sft_stress"]["gsm8k"] * (rng.random((3, n)) > 0.3))
    null = dict(scores, sft_stress=teacher, opd_stress=run_scores(base, rng, loss=0.01))
    p3 = predictions(null, {})["P3"]
    assert [q["verdict"] for q in p3["parts"]] == ["holds", "undecided", "holds"] and p3["verdict"] == "undecided"
    c = conditions(scores)
    tests = multiplicity(c, p)["tests"]
    assert tests == len({q["difference"] for d in (*c.values(), p["P1"], p["P2"], p["P3"]) for q in d["parts"]}) + 1
    assert all("verdict_holm" in d for d in (*c.values(), *p.values()))

    # P4 by TOST: OPD drifts 8% more than stress SFT, precisely. The margin (a quarter of stress SFT's drift) holds
    # that: equivalent, P4 holds; the old rule (the difference's interval excludes zero) called it contradicted.
    measures["opd_stress"] = {"kl_base_policy_target": kl_measure(stress_kl * 1.08)}
    measures["sft_mild"] = {"kl_base_policy_target": kl_measure(stress_kl * 0.3)}   # the control: far apart
    q = predictions(scores, measures)["P4 kl_base_policy_target"]
    assert verdict(q["parts"][0]["interval"]) == "holds"                           # excludes zero
    assert q["parts"][0]["verdict"] == "equivalent" and q["verdict"] == "holds"
    assert q["control"]["verdict"] == "different"
    noisy = stress_kl * np.array([[0.8], [1.0], [1.3]])                             # seeds disagree: undecided
    measures["opd_stress"] = {"kl_base_policy_target": kl_measure(noisy)}
    assert predictions(scores, measures)["P4 kl_base_policy_target"]["verdict"] == "undecided"

    scores["sft_mild"] = scores["sft_stress"]                              # mild forgets as much: undecided
    scores["opd_stress"] = run_scores(base, rng, loss=0.30)               # the student forgets more than its teacher
    measures["opd_stress"] = {"kl_base_policy_target": kl_measure(stress_kl * 2)}   # and drifts twice as far
    p = predictions(scores, measures)
    assert p["P1"]["verdict"] == "undecided" and p["P1"]["parts"][0]["verdict"] == "holds"
    assert p["P2"]["verdict"] == p["P3"]["verdict"] == p["P4 kl_base_policy_target"]["verdict"] == "contradicted"


def test_state_sources_under_one_signal_are_paired_against_each_other():
    """OPD's signal on learner, teacher and dataset states: the two others against the learner-states run, with
    paired intervals of ΔGSM8K and ΔR; runs of another signal or teacher, or on the same states, are no contrast."""
    rng = np.random.default_rng(5)
    n = 800
    base = {t: (rng.random(n) < p).astype(float)[None] for t, p in
            (("gsm8k", 0.4), ("truthfulqa", 0.9), ("truthfulqa_mc2", 0.8), ("mmlu", 0.85))}
    runs = {s.name: s for s in stages()}
    scores = {"base": base, "opd_stress": run_scores(base, rng, gain=0.1), "opd_mild": run_scores(base, rng),
              "opd_stress_on_teacher_states": run_scores(base, rng, gain=0.1),      # the same student
              "opd_stress_on_data_states": run_scores(base, rng, gain=0.3),         # a better one
              "sft_mild": run_scores(base, rng), "sft_stress": run_scores(base, rng, loss=0.1)}
    c = state_sources(scores, [runs[k] for k in scores if k != "base"])
    assert set(c) == {"opd_stress_on_teacher_states", "opd_stress_on_data_states"}
    assert all(v["against"] == "opd_stress" for v in c.values())
    same, better = c["opd_stress_on_teacher_states"], c["opd_stress_on_data_states"]
    assert same["gsm8k"]["ci95"][0] < 0 < same["gsm8k"]["ci95"][1] and max(map(abs, same["gsm8k"]["ci90"])) < 0.05
    assert better["gsm8k"]["ci95"][0] > 0.05 and better["retention"]["ci95"][0] <= 0 <= better["retention"]["ci95"][1]


def test_the_papers_conditions_are_decided_from_intervals_too():
    rng = np.random.default_rng(1)
    n = 800
    base = {t: (rng.random(n) < p).astype(float)[None] for t, p in
            (("gsm8k", 0.4), ("truthfulqa", 0.9), ("truthfulqa_mc2", 0.8), ("mmlu", 0.85))}
    paper = {"base": base, "sft_mild": run_scores(base, rng, gain=0.15), "grpo": run_scores(base, rng, gain=0.1),
             "opd_stress": run_scores(base, rng, gain=0.1)}
    stress = run_scores(base, rng, loss=0.15)
    stress["gsm8k"] = np.stack([np.where(rng.random(n) < 0.3, 0.0, row) for row in paper["base"]["gsm8k"].repeat(3, 0)])
    c = conditions({**paper, "sft_stress": stress})       # the paper's regime: a stress run below both
    assert {k: v["verdict"] for k, v in c.items()} == {"C1": "holds", "C2": "holds", "C3": "holds", "C3b": "holds",
                                                         "C4": "holds"}
    better = run_scores(base, rng, gain=0.3, loss=0.15)              # a stress run better on the target than mild
    c = conditions({**paper, "sft_stress": better})
    assert c["C3"]["verdict"] == c["C3b"]["verdict"] == "contradicted" and c["C3"]["parts"][1]["verdict"] == "holds"
    low = {t: X * (rng.random(X.shape) < 0.5) for t, X in base.items()}   # a base at 0.2 on the target
    assert conditions({"base": low})["C1"]["verdict"] == "contradicted"


def test_mmd_difference_resamples_seeds_and_shared_replicates_with_the_prompts_degrees_of_freedom():
    rng = np.random.default_rng(1)
    a = rng.normal(0.02, 0.002, (3, 200))
    same = replicate_interval(a, a + rng.normal(0, 1e-5, (3, 200)), 0.0, 64)
    assert same["ci95"][0] < 0 < same["ci95"][1] and same["ci95"][1] - same["ci95"][0] < 1e-4
    far = replicate_interval(a + 0.01, a, 0.01, 64)
    assert far["ci95"][0] > 0.009
    # 200 replicates of 8 prompts, seeds in agreement: t with the 7 df of the prompts, not the 199 of the replicates
    few = replicate_interval(np.repeat(a[:1], 3, 0), np.repeat(a[1:2], 3, 0), 0.001, 8)
    assert few["df"] == pytest.approx(7) and few["ci95"][1] - 0.001 == pytest.approx(t_quantile(0.95, 7) * few["std"])


def test_retention_along_a_curve_at_a_matched_accuracy():
    acc, ret = [np.array([0.3]), np.array([0.4]), np.array([0.5])], [np.array([1.0]), np.array([0.9]), np.array([0.7])]
    assert along(acc, ret, 0.45)[0] == pytest.approx(0.8)
    assert along(acc, ret, 0.4)[0] == pytest.approx(0.9)
    assert np.isnan(along(acc, ret, 0.6)[0])
    down = along([np.array([0.3, 0.3]), np.array([0.2, 0.3])], [np.array([1.0, 1.0]), np.array([0.9, 0.8])], 0.25)
    assert down[0] == pytest.approx(0.95) and np.isnan(down[1])             # the second curve never moves


def test_matched_gain_is_a_paired_difference_of_retention_at_gains_over_the_base():
    """Two methods climb the same gains over the base (0.1 at their snapshot, 0.2 at the end); along the way A keeps
    R = 1 - g and then 0.9 - (g - 0.1), B loses half as much. At every matched gain g, B - A is known exactly; it is
    paired (the same items), so its interval is narrow; a gain at the curves' end is missed by some resamples."""
    n = 1000

    def answers(k):   # [3 seeds, n]: the first k items right
        return np.repeat((np.arange(n) < k).astype(float)[None], 3, 0)

    def model(acc, tqa, mmlu):
        return {"gsm8k": answers(acc), "truthfulqa": answers(tqa), "truthfulqa_mc2": answers(tqa), "mmlu": answers(mmlu)}
    scores = {"base": {t: x[:1] for t, x in model(300, 600, 500).items()},
              "a@0.5": model(400, 540, 450), "a": model(500, 480, 400),      # R 0.9, then 0.8
              "b@0.5": model(400, 570, 475), "b": model(500, 540, 450)}      # R 0.95, then 0.9
    matched = frontier(scores, ["a", "b"])["matched"]
    assert matched and all(float(g) > 0 for g in matched)                    # keyed by gains over the base: +0.06
    for key, cells in matched.items():
        g = float(key)
        expected = 0.5 * g if g <= 0.1 else 0.05 + 0.5 * (g - 0.1)
        d = cells["b"]["difference"]
        assert d["against"] == "a" and "difference" not in cells["a"]
        assert d["estimate"] == pytest.approx(expected, abs=1e-9)
        assert d["ci95"][0] <= expected <= d["ci95"][1] and d["ci95"][0] > 0
        assert cells["a"]["estimate"] == pytest.approx(1 - g if g <= 0.1 else 0.9 - (g - 0.1), abs=1e-9)
        assert cells["a"]["from_base"] == (g <= 0.1)                        # the segment from the base to 1/2
    assert matched["+0.06"]["b"]["unreached"] == 0 and matched["+0.19"]["a"]["unreached"] > 0.05


def test_correlations_pearson_and_spearman():
    x = np.arange(10.0)
    c = correlation(x, x ** 3)
    assert c["spearman"]["estimate"] == pytest.approx(1.0) and 0.8 < c["pearson"]["estimate"] < 1.0
    assert correlation(x, -2 * x)["pearson"]["estimate"] == pytest.approx(-1.0)
    assert list(_ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [2.5, 0.0, 2.5, 1.0]


def test_correlation_resampled_by_method_is_wider_when_one_method_carries_it():
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(6), 5)                       # six methods, five seeds each
    x, y = rng.normal(0, 1, 30), rng.normal(0, 1, 30)         # no correlation within the five ordinary methods
    x[groups == 5] += 6
    y[groups == 5] += 6                                       # one method far from the rest on both axes
    gain = rng.normal(0, 1, 30)
    c = correlation(x, y, groups=groups, control=gain)
    point, cluster = (c[k]["ci95"][1] - c[k]["ci95"][0] for k in ("pearson", "pearson_by_method"))
    assert c["pearson"]["estimate"] > 0.7 and c["pearson"]["r2"] == pytest.approx(c["pearson"]["estimate"] ** 2)
    assert cluster > 1.5 * point and c["pearson_by_method"]["ci95"][0] < 0 < c["pearson"]["ci95"][0]
    assert abs(c["leave_one_method_out"][5]) < 0.6 < min(v for g, v in c["leave_one_method_out"].items() if g != 5)
    assert c["partial"]["estimate"] == pytest.approx(c["pearson"]["estimate"], abs=0.15)   # the gain is unrelated
    noise = rng.normal(0, 0.3, (2, 30))              # both track the gain and nothing else: the partial r vanishes
    c = correlation(gain + noise[0], gain + noise[1], groups=groups, control=gain)
    assert c["pearson"]["estimate"] > 0.8 and abs(c["partial"]["estimate"]) < 0.4


def test_mean_std_over_seeds_skips_missing_values():
    assert mean_std([]) is None
    v = mean_std([0.4, None, 0.6])
    assert v["mean"] == pytest.approx(0.5) and v["std"] == pytest.approx(0.1414, abs=1e-4) and v["n"] == 2
