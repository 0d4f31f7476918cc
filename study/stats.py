"""The study's statistics: intervals of differences (paired over items, hierarchical over seeds), the paper's
conditions and predictions decided from them, drift measures against forgetting, and retention at matched target
gain. evaluate.py gives each score its standard error, this file the intervals of the differences the study is about.

Every interval is a t-interval over seeds with the items' variance added (`studentized`; its docstring argues the
construction). The study's first intervals were percentile bootstraps resampling items and seeds (tests/test_study.py
keeps that `bootstrap` as the reference): resampling S seeds shrinks their variance by (S - 1) / S and reads
normal-like quantiles where Student's t with S - 1 degrees of freedom applies, so at S = 3 its "95%" covered about
80% in the test's simulation.
"""
import math
import warnings
from functools import lru_cache

import numpy as np

from evaluate import RETENTION_TASKS

BOOTSTRAP = 2000          # resamples of every interval's item part
SIMILAR = 0.25            # P4's equivalence margin, a fraction of stress SFT's drift on the measure (see predictions)
TASK_KEYS = ("gsm8k", "truthfulqa", "truthfulqa_mc2", "mmlu")
# the drift measures set against forgetting: MMD² of rollout states, and the policy KLs on target / retention prompts
MEASURES = {"mmd2_lexical": "MMD² lexical", "mmd2_hidden": "MMD² hidden",
            "kl_base_policy_target": "KL(π0‖π) target", "kl_policy_base_target": "KL(π‖π0) target",
            "kl_base_policy_retention": "KL(π0‖π) retention", "kl_policy_base_retention": "KL(π‖π0) retention"}


def t_two_sided(t: float, df: float) -> float:
    """P(|T| > |t|) for Student's T with floor(df) degrees of freedom (exact sums, Abramowitz & Stegun 26.7.3-4;
    the normal's beyond 1000); flooring a Satterthwaite df errs on the wide side."""
    df = max(1, int(df))
    if df > 1000:
        return math.erfc(abs(t) / math.sqrt(2))
    theta = math.atan(abs(t) / math.sqrt(df))
    odd, terms = df % 2, (df - 1) // 2 if df % 2 else df // 2
    j = np.arange(1, max(terms, 1))
    coef = np.cumprod(np.r_[1.0, (2 * j - 1 + odd) / (2 * j + odd)])[:terms]
    series = float((coef * math.cos(theta) ** (2 * np.arange(terms))).sum())
    inside = (2 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series) if odd else math.sin(theta) * series)
    return min(1.0, max(0.0, 1 - inside))


@lru_cache(maxsize=None)
def t_quantile(level: float, df: int) -> float:
    """The t with P(|T| < t) = level (bisection on t_two_sided)."""
    lo, hi = 0.0, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_two_sided(mid, df) > 1 - level else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values, boot, estimate: float, items: int) -> dict:
    """The interval of `studentized` from a statistic's per-seed values [S] and its item bootstrap on the mean over
    seeds [R]; items: how many items there are (the item part's degrees of freedom)."""
    values, boot = np.asarray(values, float), np.asarray(boot, float)
    values, S, unreached = values[np.isfinite(values)], len(values), float(np.mean(~np.isfinite(boot)))
    v_item = float(np.nanvar(boot, ddof=1))
    v_seed = float(np.var(values, ddof=1)) / len(values) if S > 1 and len(values) > 1 else 0.0
    out = {"estimate": estimate, "seeds": S, "unreached": unreached, "seeds_defined": len(values)}
    if S > 1 and len(values) < 2 or not np.isfinite(v_item):
        return {**out, "ci95": [math.nan] * 2, "ci90": [math.nan] * 2, "std": math.nan, "df": math.nan, "p": math.nan}
    var = v_item + v_seed
    df = var ** 2 / (v_item ** 2 / max(items - 1, 1) + (v_seed ** 2 / (len(values) - 1) if v_seed else 0)) if var \
        else float(max(items - 1, 1))   # no spread at all: the items alone, as when the seeds agree
    if v_seed and v_seed >= v_item:   # the seeds' part leads: their own S - 1 (Satterthwaite's df, larger, undercovers at S = 3)
        df = len(values) - 1
    se = math.sqrt(var)
    out.update(std=se, df=df, p=t_two_sided(estimate / se, df) if se > 0 else float(estimate == 0))
    for name, level in (("ci95", 0.95), ("ci90", 0.90)):
        half = t_quantile(level, max(1, int(min(df, 1001)))) * se
        out[name] = [estimate - half, estimate + half]
    return out


def studentized(scores: dict, statistic, resamples: int = BOOTSTRAP, seed: int = 0, paired: bool = True) -> dict:
    """A 95% (and 90%) t-interval of statistic(means) over seeds, with the variance of sampling the items added.

    scores: {model: {task: [seeds, items] array}}, every model's rows of one task scoring the same items in the same
    order; statistic({model: {task: [R] means}}) -> [R] array. A model with one row (the deterministic base) keeps
    it; items are resampled with one draw shared by all models when `paired`, so that how hard an item is cancels
    out of a difference between models. The study is a crossed design: the per-seed,
    per-item difference D_si = a_i + b_s + e_si has an item effect a shared by every seed (all seeds answer the
    same items), a seed effect b and their interaction e, so the estimate (the mean over n items and S seeds) has
    variance sigma_a^2/n + sigma_b^2/S + sigma_e^2/(nS). A t-interval over the per-seed values d_s alone estimates
    (sigma_b^2 + sigma_e^2/n)/S and misses the shared items' sigma_a^2/n; resampling seeds with replacement shrinks
    sigma_b^2 by (S - 1)/S and reads normal quantiles where t(S - 1) applies. Here SE^2 = V_item + var_s(d_s)/S,
    V_item the item bootstrap's variance of the statistic on the mean over seeds (sigma_a^2/n + sigma_e^2/(nS)):
    every term is there, sigma_e^2/(nS) twice. Subtracting the double count (S/(S - 1) x the gap between the per-seed
    and the seed-mean item variance) was tried and dropped: at S = 3 it left the seed part a noisier estimate and
    the simulation's coverage at 88%. The interval is estimate ± t SE: t with the seeds' S - 1 degrees of freedom
    when their part is the larger (Satterthwaite's df, larger there, covered 91% at S = 3), else Satterthwaite's
    for the two parts (n - 1, S - 1), which is the normal when the seeds agree or there is one. A ratio (retention
    R = post/base) goes the same way, per seed and per resample (the bootstrap's delta method). p: the two-sided
    t-test's p-value of zero. tests/test_study.py's simulation measures its coverage against `bootstrap`'s."""
    rng = np.random.default_rng(seed)

    def draw(n):   # [resamples, n]: how often each of n items is drawn in each resample
        return rng.multinomial(n, np.full(n, 1 / n), size=resamples).astype(float)

    n_items = {t: X.shape[1] for m in scores.values() for t, X in m.items()}
    shared = {t: draw(n) for t, n in n_items.items()} if paired else {}
    boot = {name: {t: X.mean(0) @ (shared[t] if paired else draw(n_items[t])).T / X.shape[1] for t, X in m.items()}
            for name, m in scores.items()}                        # [R]: the mean over seeds on each resample's items
    S = max(len(X) for m in scores.values() for X in m.values())

    def stat(means):
        return np.asarray(statistic(means), dtype=float)

    def seed(s):   # seed s of every model with S rows; a one-row model keeps its row
        return stat({name: {t: X[s if len(X) > 1 else 0].mean(keepdims=True) for t, X in m.items()}
                     for name, m in scores.items()})[0]

    estimate = float(stat({name: {t: X.mean(keepdims=True)[0] for t, X in m.items()} for name, m in scores.items()})[0])
    with warnings.catch_warnings():   # a seed whose statistic is undefined (NaN) is left out of the spread
        warnings.simplefilter("ignore", RuntimeWarning)
        out = seed_interval([seed(s) for s in range(S)], stat(boot), estimate, min(n_items.values()))
    return {**out, "resamples": resamples}


def verdict(interval: dict, direction: int = 1) -> str:
    """holds: the 95% interval excludes zero on the predicted side (direction +1: above, -1: below);
    contradicted: it excludes zero on the other side; undecided: it includes zero."""
    lo, hi = sorted(direction * x for x in interval["ci95"])
    return "holds" if lo > 0 else "contradicted" if hi < 0 else "undecided"



def eq12(m: dict, name: str):
    """Mean forgetting F and mean retention R of model `name` (Eq. 12) from per-task means (arrays over resamples)."""
    F = np.mean([m["base"][t] - m[name][t] for t in RETENTION_TASKS], 0)
    R = np.mean([m[name][t] / m["base"][t] for t in RETENTION_TASKS], 0)
    return F, R


def interval(scores: dict, names, statistic, tasks=TASK_KEYS) -> dict:
    """The studentized interval of statistic over the base and models `names` (only `tasks` resampled)."""
    chosen = {n: {t: scores[n][t] for t in tasks} for n in dict.fromkeys(["base", *names])}
    return studentized(chosen, statistic)


def target_minus(scores: dict, a: str, b: str) -> dict:
    """The interval of GSM8K(a) - GSM8K(b), paired over items and seeds (either may be the base)."""
    return interval(scores, [a, b], lambda m: m[a]["gsm8k"] - m[b]["gsm8k"], ["gsm8k"])


def differences(scores: dict, name: str) -> dict:
    """A model against the base: each task's gain, and F and R of Eq. 12, with their intervals."""
    out = {f"gain_{t}": interval(scores, [name], lambda m, t=t: m[name][t] - m["base"][t], [t]) for t in TASK_KEYS}
    out["forgetting"] = interval(scores, [name], lambda m: eq12(m, name)[0], RETENTION_TASKS)
    out["retention"] = interval(scores, [name], lambda m: eq12(m, name)[1], RETENTION_TASKS)
    return out


def replicate_interval(a: np.ndarray, b: np.ndarray, estimate: float, prompts: int, values=None) -> dict:
    """Interval of mean(a) - mean(b) for per-seed bootstrap replicates a, b [seeds, B] of an MMD² (drift.py
    resamples the prompts with the same draws for every model), built as `studentized`'s: the replicates' variance
    of the mean over seeds is the item part, with the degrees of freedom of the `prompts` it resamples (not of the B
    replicates: more replicates estimate that variance better, they add no prompts), the spread of the per-seed
    differences `values` (default: of the replicates' means) the seed part."""
    values = a.mean(1) - b.mean(1) if values is None else values
    return {**seed_interval(values, (a - b).mean(0), estimate, prompts), "resamples": a.shape[1]}


def drift_interval(measures: dict, a: str, b: str, key: str) -> dict:
    """Interval of drift measure `key` of run a minus run b (seed s with seed s)."""
    if key.startswith("mmd2"):
        ra, rb = (np.array([d["replicates"] for d in measures[n][key]]) for n in (a, b))
        values = np.array([d["value"] for d in measures[a][key]]) - np.array([d["value"] for d in measures[b][key]])
        return replicate_interval(ra, rb, float(values.mean()), min(d["prompts"] for d in measures[a][key]), values)
    per_prompt = {n: {key: np.array([d["per_prompt"] for d in measures[n][key]])} for n in (a, b)}
    return studentized(per_prompt, lambda m: m[a][key] - m[b][key])


def state_sources(scores: dict, runs: list) -> dict:
    """Each run (runs: study.stages.Stage) against the first run of its signal and teacher on other states: ΔGSM8K
    and ΔR, paired over items and seeds, with 95% intervals. An interval that includes zero does not show two runs
    the same: *within ±b* is the narrowest margin two one-sided tests at 5% accept (b: the 90% interval's farther
    end), so a difference up to b is not ruled out."""
    out = {}
    for r in runs:
        first = next(f for f in runs if (f.signal, f.teacher) == (r.signal, r.teacher))
        if r.states != first.states:
            a, b = r.name, first.name
            out[a] = {"against": b,
                      "gsm8k": target_minus(scores, a, b),
                      "retention": interval(scores, [a, b], lambda m: eq12(m, a)[1] - eq12(m, b)[1], RETENTION_TASKS)}
    return out


def combined(parts: list[dict]) -> str:
    """A prediction of several parts holds when all hold, is contradicted when any is, else undecided."""
    verdicts = [p["verdict"] for p in parts]
    return "contradicted" if "contradicted" in verdicts else "holds" if all(v == "holds" for v in verdicts) else "undecided"


def decided(text: str, iv: dict, digits: int = 3) -> dict:
    """One difference of a prediction or condition: its interval, the verdict read from it and its test's p-value."""
    return {"difference": text, "interval": iv, "verdict": verdict(iv), "digits": digits, "p": iv.get("p")}


def one_sided(x: float, df: float) -> float:
    """P(T > x) for Student's T with df degrees of freedom."""
    p = t_two_sided(x, df) / 2
    return p if x > 0 else 1 - p


def equivalence(iv: dict, margin: float) -> tuple[str, float]:
    """Two one-sided tests (TOST) of a difference against ±margin: *equivalent* when the 90% interval lies inside
    (both one-sided tests at 5%), *different* when the 95% interval lies wholly beyond the margin (so it excludes
    zero too), else *undecided*; with the p-value of the outcome (TOST's larger one-sided p for equivalent, the
    two-sided test of |difference| > margin for different: under 5% exactly when the 95% interval lies beyond the
    margin, as Holm's raw rule needs; the smaller of the two when undecided)."""
    est, se, df = iv["estimate"], iv["std"], iv.get("df", math.inf)
    if not se >= 0:                   # no interval (NaN): nothing is decided
        return "undecided", math.nan
    if se == 0:
        return ("equivalent" if abs(est) < margin else "different"), 0.0
    p_same = max(one_sided((est + margin) / se, df), one_sided((margin - est) / se, df))
    p_apart = min(1.0, 2 * min(one_sided((est - margin) / se, df), one_sided((-est - margin) / se, df)))
    if -margin < iv["ci90"][0] and iv["ci90"][1] < margin:
        return "equivalent", p_same
    if iv["ci95"][0] > margin or iv["ci95"][1] < -margin:
        return "different", p_apart
    return "undecided", min(p_same, p_apart)


def holm(p: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values: the k-th smallest times (m - k + 1), made monotone, capped at 1."""
    order = np.argsort(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((len(p) - np.arange(len(p))) * np.asarray(p, float)[order]))
    return adjusted[np.argsort(order)].tolist()


def multiplicity(conditions: dict, predictions: dict, alpha: float = 0.05) -> dict:
    """Holm-adjusts every verdict the study decides (each distinct difference of C1-C4 and P1-P4 once; P4's drift
    tests one per measure): each part gains p_holm and verdict_holm (its verdict when p_holm < alpha, else
    undecided), each condition and prediction verdict_holm. Returns how many tests the family holds."""
    decisions = {**conditions, **predictions}
    tests = {}
    for key, c in decisions.items():
        for q in c["parts"]:
            tests.setdefault(q["difference"] if not key.startswith("P4") or q is not c["parts"][0] else key, []).append(q)
    names = [k for k, qs in tests.items() if qs[0]["p"] is not None and math.isfinite(qs[0]["p"])]
    for name, p in zip(names, holm([tests[k][0]["p"] for k in names])):
        for q in tests[name]:
            q["p_holm"], q["verdict_holm"] = p, q["verdict"] if p < alpha else "undecided"
    for key, c in decisions.items():
        held = [q.get("verdict_holm", "undecided") for q in c["parts"]]
        c["verdict_holm"] = (p4(held[0], held[1]) if key.startswith("P4") else
                             combined([{"verdict": v} for v in held]))
    return {"tests": len(names), "alpha": alpha, "method": "Holm"}


def p4(drift: str, retention: str) -> str:
    """P4 for one measure: holds when the drifts are equivalent and the retentions differ, contradicted when the
    drifts are different, else undecided."""
    return "contradicted" if drift == "different" else "holds" if drift == "equivalent" and retention != "undecided" \
        else "undecided"


def predictions(scores: dict, measures: dict) -> dict:
    """The paper's predictions P1-P4, each decided from the 95% intervals of the differences it is about.

    A difference predicted positive *holds* when its interval lies above zero, is *contradicted* when it lies
    below, and is *undecided* when it includes zero; a prediction of several differences holds when all hold
    and is contradicted when any is. P1: stress SFT forgets (F > 0) and mild SFT keeps more (R mild - R stress
    > 0). P2: the on-policy runs, GRPO and OPD from the stress teacher, keep more than stress SFT
    (R - R stress > 0). P3: the OPD student beats its degraded teacher on the target and on retention, and ends
    above the base on the target (as the paper's did: 0.466 against 0.448), so an OPD run that changed nothing fails.
    P4, per drift measure: stress SFT and OPD have equivalent drift and different retention. Equivalence is two
    one-sided tests against a margin fixed before the study (SIMILAR = 0.25 of stress SFT's drift on the measure):
    the drifts are *equivalent* when the 90% interval of their difference lies inside ±margin, *different* when
    the 95% interval lies wholly beyond it (which contradicts P4 for that measure), else undecided. Mild SFT
    against stress SFT is the control beside it: a measure that tracks forgetting should call those two
    different.

    P4's margin, {similar} x stress SFT's drift: a quarter of stress SFT's own drift on the measure: a difference that
    small is a quarter of the effect the paper sets it against (stress SFT moved that far from the base), so 'similar
    drift' means the two runs' drifts agree to within 25%, fixed before the study's numbers were read."""

    def R_minus(a, b, text):
        return decided(text, interval(scores, [a, b], lambda m: eq12(m, a)[1] - eq12(m, b)[1], RETENTION_TASKS))

    claims = {"P1": "stress SFT forgets, mild SFT does not", "P2": "the on-policy runs retain more than stress SFT",
              "P3": "the OPD student beats its degraded teacher and the base",
              "P4": "similar drift can come with different retention"}
    out = {}
    if {"sft_mild", "sft_stress"} <= set(scores):
        out["P1"] = [decided("F(SFT stress)", interval(scores, ["sft_stress"], lambda m: eq12(m, "sft_stress")[0],
                                                    RETENTION_TASKS)),
                     R_minus("sft_mild", "sft_stress", "R(SFT mild) - R(SFT stress)")]
    if {"grpo", "opd_stress", "sft_stress"} <= set(scores):
        out["P2"] = [R_minus("grpo", "sft_stress", "R(GRPO) - R(SFT stress)"),
                     R_minus("opd_stress", "sft_stress", "R(OPD) - R(SFT stress)")]
    if {"opd_stress", "sft_stress"} <= set(scores):
        out["P3"] = [decided("GSM8K(OPD) - GSM8K(SFT stress)", target_minus(scores, "opd_stress", "sft_stress")),
                     decided("GSM8K(OPD) - GSM8K(base)", target_minus(scores, "opd_stress", "base")),
                     R_minus("opd_stress", "sft_stress", "R(OPD) - R(SFT stress)")]
    result = {k: {"claim": claims[k], "parts": v, "verdict": combined(v)} for k, v in out.items()}

    def tost(name, label, key, margin):   # run `name`'s drift on measure `key` against stress SFT's, by TOST
        q = decided(f"{MEASURES[key]}({label}) - {MEASURES[key]}(SFT stress)",
                 drift_interval(measures, name, "sft_stress", key), 5)
        q["verdict"], q["p"] = equivalence(q["interval"], margin)
        return q

    if {"opd_stress", "sft_stress"} <= set(measures):
        retention = out["P3"][-1]
        for key in measures["sft_stress"]:
            margin = SIMILAR * abs(np.mean([x["value"] for x in measures["sft_stress"][key]]))
            drift = tost("opd_stress", "OPD", key, margin)
            control = tost("sft_mild", "SFT mild", key, margin) if key in measures.get("sft_mild", {}) else None
            result[f"P4 {key}"] = {"claim": claims["P4"], "verdict": p4(drift["verdict"], retention["verdict"]),
                                   "similar": drift["verdict"] == "equivalent", "margin": margin, "control": control,
                                   "parts": [drift, retention]}
    return result


def conditions(scores: dict) -> dict:
    """The four conditions of the paper's experiment that a world must meet before P1-P4 test anything, each
    decided like a prediction (every difference's interval above zero). C1: the base's target accuracy is within
    [0.30, 0.60] and its retention scores above chance (0.25: four choices). C2: mild SFT raises the target with
    mean retention R of at least 0.98. C3: stress SFT is a degraded teacher, below mild SFT on the target and on
    retention; C3b: below the base on the target too, as the paper's was. C4: GRPO and OPD from the stress
    teacher train long enough to raise the target."""
    def part(text, names, statistic, tasks):
        return decided(text, interval(scores, names, statistic, tasks))

    def gain(name, label):
        return decided(f"GSM8K({label}) - GSM8K(base)", target_minus(scores, name, "base"))

    out = {"C1": [part("GSM8K(base) - 0.30", [], lambda m: m["base"]["gsm8k"] - 0.30, ["gsm8k"]),
                  part("0.60 - GSM8K(base)", [], lambda m: 0.60 - m["base"]["gsm8k"], ["gsm8k"])] +
                 [part(f"{t}(base) - 0.25", [], lambda m, t=t: m["base"][t] - 0.25, [t]) for t in ("truthfulqa", "mmlu")]}
    if "sft_mild" in scores:
        out["C2"] = [gain("sft_mild", "SFT mild"),
                     part("R(SFT mild) - 0.98", ["sft_mild"], lambda m: eq12(m, "sft_mild")[1] - 0.98, RETENTION_TASKS)]
    if {"sft_mild", "sft_stress"} <= set(scores):
        pair = ["sft_mild", "sft_stress"]
        out["C3"] = [decided("GSM8K(SFT mild) - GSM8K(SFT stress)", target_minus(scores, *pair)),
                     part("R(SFT mild) - R(SFT stress)", pair,
                          lambda m: eq12(m, "sft_mild")[1] - eq12(m, "sft_stress")[1], RETENTION_TASKS)]
        out["C3b"] = [decided("GSM8K(base) - GSM8K(SFT stress)", target_minus(scores, "base", "sft_stress"))]
    if {"grpo", "opd_stress"} <= set(scores):
        out["C4"] = [gain("grpo", "GRPO"), gain("opd_stress", "OPD")]
    return {k: {"parts": v, "verdict": combined(v)} for k, v in out.items()}


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 0..n-1, ties sharing their mean rank (Spearman's convention)."""
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return (np.cumsum(counts) - (counts + 1) / 2)[inverse]   # a value's ranks run from cumsum - count to cumsum - 1


def _partial(x, y, z):
    """Pearson's r of x and y after removing from each its least-squares line in z (the partial correlation)."""
    Z = np.stack([np.ones_like(z), z], 1)
    rx, ry = (v - Z @ np.linalg.lstsq(Z, v, rcond=None)[0] for v in (x, y))
    return np.corrcoef(rx, ry)[0, 1]


def correlation(x, y, seed: int = 0, groups=None, control=None) -> dict:
    """Pearson (with R²) and Spearman correlation of x with y, each with a 95% bootstrap interval over the points.

    With `groups` (each point's method) also Pearson's r resampled by method (a method's seeds are one cluster: they
    are not independent points, and one method far from the rest can carry r alone), r with each method left out,
    and with `control` (each point's target gain) the partial r on it, also resampled by method."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(x), (BOOTSTRAP, len(x)))
    out = {"n": len(x)}
    with warnings.catch_warnings():   # a resample of one repeated point has no correlation: NaN, dropped
        warnings.simplefilter("ignore", RuntimeWarning)

        def summary(f, draws):
            boot = np.array([f(d) for d in draws])
            boot = boot[np.isfinite(boot)]
            return {"estimate": float(f(np.arange(len(x)))),
                    "ci95": np.quantile(boot, [0.025, 0.975]).tolist() if len(boot) else [float("nan")] * 2}
        out["pearson"] = summary(lambda d: np.corrcoef(x[d], y[d])[0, 1], draws)
        out["pearson"]["r2"] = out["pearson"]["estimate"] ** 2
        out["spearman"] = summary(lambda d: np.corrcoef(_ranks(x[d]), _ranks(y[d]))[0, 1], draws)
        if groups is not None:
            groups = np.asarray(groups)
            names = list(dict.fromkeys(groups))
            members = [np.flatnonzero(groups == g) for g in names]
            clusters = [np.concatenate([members[k] for k in row]) for row in rng.integers(0, len(names), (BOOTSTRAP, len(names)))]
            out["pearson_by_method"] = summary(lambda d: np.corrcoef(x[d], y[d])[0, 1], clusters)
            out["leave_one_method_out"] = {g: float(np.corrcoef(x[groups != g], y[groups != g])[0, 1]) for g in names}
            if control is not None:
                z = np.asarray(control, float)
                out["partial"] = summary(lambda d: _partial(x[d], y[d], z[d]), clusters)
    return out


def along(acc: list, ret: list, level: float) -> np.ndarray:
    """Retention where a curve through points (acc_k, ret_k), k = 0, 1, .. (arrays over resamples) first reaches
    target accuracy (or gain) `level`, linear between points; NaN where it never does."""
    out = np.full(np.shape(acc[0]), np.nan)
    for a0, a1, r0, r1 in zip(acc, acc[1:], ret, ret[1:]):
        moved = a0 != a1
        hit = np.isnan(out) & moved & (np.minimum(a0, a1) <= level) & (level <= np.maximum(a0, a1))
        w = (level - a0) / np.where(moved, a1 - a0, 1)
        out = np.where(hit, r0 + w * (r1 - r0), out)
    return out


def frontier(scores: dict, names: list[str]) -> dict:
    """Each method's trajectory (base, its --frontier snapshots: the scores named `name@fraction`, the final adapter)
    as target accuracy against mean retention, per seed and in the mean; and at target gains over the base that at
    least two methods reach, each method's retention R there and its paired difference from the first method in
    `names` reaching it (items and seeds shared, so the difference is paired), with intervals (retention at matched
    gain). Each cell also says which share of the item resamples never reach the gain ("unreached": those resamples
    carry no R, and a share far from 0 means the level is at the edge of the curve), how many seeds' own curves reach
    it ("seeds_defined": the others are left out of the seeds' spread; one of several gives no interval), and whether
    the mean curve first reaches it between the base and the run's first snapshot ("from_base": R there is one
    straight segment). Every point is scored on the items all points share: the profile's snapshot evaluations may
    take GSM8K's and TruthfulQA's first items only (evaluate.py --limit-gsm8k, --limit-truthfulqa: a prefix of
    each split), and the base and final adapter are cut to them."""
    on = ["base"] + [k for k in scores if k.split("@")[0] in names]
    first = {t: min(scores[n][t].shape[1] for n in on) for t in TASK_KEYS}    # snapshots may score a task's first items
    scores = {n: {t: scores[n][t][:, :first[t]] for t in TASK_KEYS} for n in on}
    curves = {}
    for name in names:
        points = sorted((k for k in scores if k.startswith(f"{name}@")), key=lambda k: float(k.split("@")[1])) + [name]
        if len(points) == 1:
            continue
        means = {n: {t: scores[n][t].mean(1) for t in TASK_KEYS} for n in ["base", *points]}   # per seed
        curves[name] = {"fractions": [0.0] + [float(p.split("@")[1]) for p in points[:-1]] + [1.0], "points": points,
                        "gsm8k": [float(scores["base"]["gsm8k"].mean())] + [float(means[p]["gsm8k"].mean()) for p in points],
                        "retention": [1.0] + [float(eq12(means, p)[1].mean()) for p in points],
                        "per_seed": {"gsm8k": [means[p]["gsm8k"].tolist() for p in points],
                                     "retention": [eq12(means, p)[1].tolist() for p in points]}}
    base_acc = float(scores["base"]["gsm8k"].mean())
    ranges = {n: (min(c["gsm8k"]) - base_acc, max(c["gsm8k"]) - base_acc) for n, c in curves.items()}
    gains = [g for g in np.round(np.arange(min([0, *(r[0] for r in ranges.values())]),
                                           max([0, *(r[1] for r in ranges.values())]), 0.01), 2)
             if abs(g) >= 0.005 and sum(lo <= g <= hi for lo, hi in ranges.values()) >= 2]
    gains = [gains[i] for i in np.linspace(0, len(gains) - 1, min(len(gains), 8)).round().astype(int)] if gains else []

    def retention(m, c, g):   # R where the curve of gains over the base first reaches g, per resample (Eq. 12)
        return along([np.zeros_like(m["base"]["gsm8k"])] + [m[p]["gsm8k"] - m["base"]["gsm8k"] for p in c["points"]],
                     [np.ones_like(m["base"]["gsm8k"])] + [eq12(m, p)[1] for p in c["points"]], g)
    table = {}
    for g in gains:
        reached = [n for n, (lo, hi) in ranges.items() if lo <= g <= hi]
        table[f"{g:+.2f}"] = cells = {}
        for name in reached:
            c, ref = curves[name], curves[reached[0]]
            cells[name] = interval(scores, c["points"], lambda m, c=c: retention(m, c, g), ("gsm8k", *RETENTION_TASKS))
            steps = np.array(c["gsm8k"]) - base_acc
            cells[name]["from_base"] = bool(min(steps[:2]) <= g <= max(steps[:2]))
            if name != reached[0]:
                cells[name]["difference"] = interval(scores, ref["points"] + c["points"], lambda m, c=c, ref=ref: (
                    retention(m, c, g) - retention(m, ref, g)), ("gsm8k", *RETENTION_TASKS))
                cells[name]["difference"]["against"] = reached[0]
    return {"curves": curves, "base_gsm8k": base_acc, "matched": table}
