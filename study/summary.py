"""The study's summary, results.json: per model its scores, forgetting and retention, drift and state locality
(mean ± std over seeds), the intervals of every difference from the base, the paper's conditions and predictions,
the drift measures' correlations with forgetting and, with --frontier, retention along each run. Read from the
files the stages wrote (evaluations and their per-item predictions, drift results, training logs).
"""
import json
import math
import os
import statistics
from pathlib import Path

import numpy as np

import evaluate
from study.stages import FRONTIER, read_json, stages
from study.stats import (MEASURES, TASK_KEYS, conditions, correlation, differences, frontier, interval,
                         multiplicity, predictions, state_sources)


def read_log(path: str) -> list[dict]:
    lines = Path(path).read_text().splitlines() if os.path.exists(path) else []
    return [json.loads(line) for line in lines if line.strip()]


def mean_std(values: list) -> dict | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def locality(log: list[dict]) -> dict:
    """State NLL: the mean per-token NLL, under the frozen base policy, of the state tokens where the step applied
    supervision (high = off-policy states). Target NLL: the learner's NLL of its supervision targets, over the first
    and the last tenth of the run."""
    state, target = ([r[key] for r in log if key in r] for key in ("state_nll_base", "target_nll"))
    tenth = max(1, len(target) // 10)
    return {"state_nll_base": statistics.fmean(state) if state else None,
            "target_nll_start": statistics.fmean(target[:tenth]) if target else None,
            "target_nll_end": statistics.fmean(target[-tenth:]) if target else None}


def seed_scores(paths: list[str], keys=TASK_KEYS) -> dict:
    """{task: [seeds, items]} per-item scores of evaluations (their predictions JSONL beside each JSON)."""
    tables = [evaluate.item_scores(read_log(os.path.splitext(p)[0] + ".jsonl")) for p in paths]
    return {t: np.stack([tb[t] for tb in tables]) for t in keys if all(t in tb for tb in tables)}


def pass_scores(paths: list[str]) -> dict:
    """{gsm8k_pass@k: [seeds, items]} from pass@k evaluations."""
    return seed_scores(paths, [k for k in evaluate.item_scores(read_log(os.path.splitext(paths[0])[0] + ".jsonl"))
                               if k.startswith("gsm8k_pass@")])


def pass_at_k(scores: dict) -> dict:
    """{k: mean ± std over seeds} of GSM8K pass@k from its per-item scores (pass_scores)."""
    return {key.split("@")[1]: mean_std([float(x) for x in v.mean(1)]) for key, v in scores.items()}


def drift_measures(drift_paths: list[dict]) -> dict:
    """{measure: [per seed {value, and replicates (MMD²) or per_prompt (KL)}]} from a run's drift JSONs."""
    out = {}
    for paths in drift_paths:
        for feat, path in paths.items():
            d = read_json(path)
            if "replicates" in d.get("mmd2_bootstrap", {}):
                # the replicates resample the prompts: their count is the item part's
                prompts = d["policy"]["rollouts"] // d["settings"]["samples_per_prompt"]
                out.setdefault(f"mmd2_{feat}", []).append({"value": d["mmd2"], "prompts": prompts,
                                                           "replicates": d["mmd2_bootstrap"]["replicates"]})
            for where, kl in d.get("policy_kl", {}).items():
                for k in ("kl_base_policy", "kl_policy_base"):
                    out.setdefault(f"{k}_{where}", []).append({"value": kl[k], "per_prompt": kl["per_prompt"][k]})
    return {k: out[k] for k in MEASURES if k in out and len(out[k]) == len(drift_paths)}


def summarize(args, runs: dict, costs: dict) -> dict:
    """results.json: per model the scores, forgetting/retention, drift and state locality (mean ± std over seeds),
    the intervals of every difference from the base, the predictions, the drift measures' correlations with
    forgetting and, with --frontier, retention along each run."""
    base_path = os.path.join(args.out, "eval", "base.json")
    base = read_json(base_path)
    data = args.data_dir or ("tiny/data" if args.model == "tiny" else "huggingface hub")
    summary = {"model": args.model, "profile": args.profile, "seeds": args.seeds, "data_dir": data,
               "protocol": {t: v["protocol"] for t, v in base["tasks"].items()}, "models": {}, "costs": costs}
    summary["models"]["base"] = {"label": "Base", **{t: mean_std([base["tasks"][t]["score"]]) for t in evaluate.TASKS},
                                 "truthfulqa_mc2": mean_std([base["tasks"]["truthfulqa"]["mc2"]]),
                                 "stderr": {t: v["stderr"] for t, v in base["tasks"].items()}}
    scores, measures, points = {"base": seed_scores([base_path])}, {}, []
    base_pass = os.path.join(args.out, "eval", "base_passk.json")
    passes = {"base": pass_scores([base_pass])} if args.variants else {}     # pass@k: reproduce.py --variants
    if passes:
        summary["models"]["base"]["pass_at_k"] = pass_at_k(passes["base"])
        gsm8k = read_json(base_pass)["tasks"]["gsm8k"]
        summary["pass_protocol"] = {**gsm8k["protocol"]["pass_at_k"], "problems": gsm8k["n"]}
    for stage in (s for s in stages() if s.name in runs):   # the runs this study did (reproduce.py --variants, --only)
        per_seed = [r for r in runs[stage.name] if "failed" not in r]
        row = {"label": stage.label, "states": stage.states, "signal": stage.signal,
               "runs": runs[stage.name], "failed": [r["failed"] for r in runs[stage.name] if "failed" in r]}
        evals = [read_json(r["eval"]) for r in per_seed if "eval" in r]
        for task in evaluate.TASKS:
            row[task] = mean_std([e["tasks"][task]["score"] for e in evals if task in e["tasks"]])
        row["truthfulqa_mc2"] = mean_std([e["tasks"]["truthfulqa"]["mc2"] for e in evals if "truthfulqa" in e["tasks"]])
        for k in ("forgetting", "retention"):
            row[k] = mean_std([e["forgetting"]["mean"][k] for e in evals if "forgetting" in e])
        for feat in args.features.split(","):
            drifts = [read_json(r["drift"][feat]) for r in per_seed if feat in r.get("drift", {})]
            row[f"drift_{feat}"] = {k: mean_std([d[k] for d in drifts]) for k in
                                    ("mmd2", "centroid_l2", "sliced_wasserstein", "jaccard")}
            row[f"drift_{feat}"]["mmd2_bootstrap_std"] = mean_std([d["mmd2_bootstrap"]["std"] for d in drifts
                                                                   if "mmd2_bootstrap" in d])
        locs = [locality(read_log(r["log"])) for r in per_seed]
        row["locality"] = {k: mean_std([loc[k] for loc in locs]) for k in
                           ("state_nll_base", "target_nll_start", "target_nll_end")}
        if len(evals) == len(per_seed) and evals:
            scores[stage.name] = seed_scores([r["eval"] for r in per_seed])
            row["intervals"] = differences(scores, stage.name)
            for f in FRONTIER:
                if all(str(f) in r.get("snapshots", {}) for r in per_seed):
                    scores[f"{stage.name}@{f}"] = seed_scores([r["snapshots"][str(f)] for r in per_seed])
            if passes and all("passk" in r for r in per_seed):
                passes[stage.name] = pass_scores([r["passk"] for r in per_seed])
                row["pass_at_k"] = pass_at_k(passes[stage.name])
                row["pass_intervals"] = {k: interval(passes, [stage.name], lambda m, k=k: m[stage.name][k] - m["base"][k],
                                                     [k]) for k in passes["base"]}
            measures[stage.name] = drift_measures([r.get("drift", {}) for r in per_seed])
            row["measures"] = {k: mean_std([d["value"] for d in v]) for k, v in measures[stage.name].items()}
            points += [{"run": stage.name, **{k: v[i]["value"] for k, v in measures[stage.name].items()},
                        **{k: e["forgetting"]["mean"][k] for k in ("forgetting", "retention")},
                        "gsm8k": e["tasks"]["gsm8k"]["score"]} for i, e in enumerate(evals)]
        summary["models"][stage.name] = row
    summary["conditions"] = conditions(scores)
    summary["predictions"] = predictions(scores, measures)
    summary["multiplicity"] = multiplicity(summary["conditions"], summary["predictions"])
    summary["state_sources"] = state_sources(scores, [s for s in stages() if s.name in scores])
    summary["correlations"] = {k: correlation([p[k] for p in points], [p["forgetting"] for p in points],
                                              groups=[p["run"] for p in points], control=[p["gsm8k"] for p in points])
                               for k in MEASURES if points and all(k in p for p in points)}
    summary["points"] = points
    if args.frontier:
        summary["frontier"] = frontier(scores, [s.name for s in stages() if s.name in scores])
    return summary
