"""The study's report: results.md (Table 2 with the paper's numbers beside ours, every difference from the base
with its interval, drift and the policy KLs, pass@k, the state-source x signal grid, state locality, the paper's
conditions and predictions, the cost of every stage) and its plots, written from results.json's summary.
"""
import os
import sys

from cli import write_text
from study.stages import FRONTIER, PROFILES, stages
from study.stats import BOOTSTRAP, MEASURES, SIMILAR, TASK_KEYS, conditions, predictions, state_sources
from study.summary import locality, read_log

CURVE_LABELS = {"loss": "loss (nats per supervised token)", "reward": "mean exact-answer reward",
                "accepted": "fraction of samples correct", "reverse_kl_sampled": "sampled reverse KL per token"}

# The paper's Table 2 (GSM8K, TruthfulQA, MMLU) and the figures its text gives (MMD; the KL-OPD collapse).
PAPER = {
    "base": {"gsm8k": 0.448, "truthfulqa": 0.300, "mmlu": 0.436},
    "sft_mild": {"gsm8k": 0.512},
    "sft_stress": {"gsm8k": 0.420, "truthfulqa": 0.245, "mmlu": 0.364, "mmd2": 0.01093},
    "opd_stress": {"gsm8k": 0.466, "truthfulqa": 0.275, "mmlu": 0.430, "mmd2": 0.01092},
    "opd_kl": {"gsm8k": 0.040},
    "grpo": {"gsm8k": 0.472, "truthfulqa": 0.290, "mmlu": 0.442},
}


def fmt(v: dict | None, digits: int = 3, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v['mean']:{'+' if signed else ''}.{digits}f}" + (f" ± {v['std']:.{digits}f}" if v["n"] > 1 else "")


def paragraph(fn, i: int = 0, **values) -> str:
    """Paragraph i of fn's docstring on one line, its {fields} filled from `values`: results.md's prose is the
    docstring of the code that computes or renders what it explains."""
    return " ".join(line.strip() for line in fn.__doc__.split("\n\n")[i].split("\n")).format(**values)


def report(summary: dict, out_dir: str, plots: list[str]) -> str:
    """results.md: Table 2's layout with the paper's numbers in parentheses, then drift, locality, predictions.

    Written by `reproduce.py`; every number below is in results.json beside this file. {seeds}The paper's numbers
    (Qwen3-0.6B-Base on the real tasks) are in parentheses where it gives them; on another model or world, compare
    directions and gaps, not levels. Settings (study/stages.py PROFILES[{profile}]): {settings}.

    F = base − post and R = post / base per retention task, averaged over TruthfulQA (MC1) and MMLU (Eq. 12). MMD² is
    the unbiased RBF-kernel estimate between the model's rollout states and the base model's (drift.py). The paper's
    drift figures are quoted from its text, which calls them MMD without saying whether squared; its KL-OPD GSM8K
    figure (0.040) too.

    Multiplicity: this report decides {tests} verdicts (each distinct difference of C1-C4 and P1-P4 once, P4's drift
    test once per measure). Beside each raw verdict (its own interval, 5%) is {method}'s, from the same t-tests'
    p-values adjusted over all {tests}: a verdict whose adjusted p is not under {alpha} becomes undecided."""
    models, n = summary["models"], summary["seeds"]
    seeds = "Mean ± std over seeds (the base is evaluated once: greedy decoding and scoring are deterministic). "
    lines = [f"# The study on `{summary['model']}` ({summary['profile']} settings, {n} seed{'s' * (n > 1)})", "",
             paragraph(report, 1, seeds=seeds if n > 1 else "", profile=repr(summary["profile"]),
                       settings=PROFILES[summary["profile"]]["settings"]),
             "", "## Table 2: target accuracy, retention, drift", "",
             "| model | GSM8K | TruthfulQA MC1 | MMLU | mean forgetting F | mean retention R | MMD² (lexical) | MMD² (hidden) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(name, value, paper_key=None, digits=3, signed=False):
        paper = PAPER.get(name, {}).get(paper_key)
        return fmt(value, digits, signed) + (f" ({paper:.{digits}f})" if paper is not None else "")

    for name, row in models.items():
        label = row["label"] + (" — failed: " + "; ".join(row["failed"]) if row.get("failed") else "")
        lex, hid = row.get("drift_lexical", {}).get("mmd2"), row.get("drift_hidden", {}).get("mmd2")
        lines.append(f"| {label} | {cell(name, row['gsm8k'], 'gsm8k')} | {cell(name, row['truthfulqa'], 'truthfulqa')} | "
                     f"{cell(name, row['mmlu'], 'mmlu')} | {cell(name, row.get('forgetting'), signed=True)} | "
                     f"{cell(name, row.get('retention'))} | {cell(name, lex, 'mmd2', 5)} | {cell(name, hid, digits=4)} |")
    lines += ["", paragraph(report, 2), "",
              "## Drift in detail", "",
              "| model | features | MMD² | bootstrap std | centroid L2 | sliced Wasserstein | Jaccard |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, row in models.items():
        for key in [k for k in row if k.startswith("drift_")]:
            d = row[key]
            lines.append(f"| {row['label']} | {key[6:]} | {fmt(d['mmd2'], 5)} | {fmt(d['mmd2_bootstrap_std'], 5)} | "
                         f"{fmt(d['centroid_l2'], 4)} | {fmt(d['sliced_wasserstein'], 4)} | {fmt(d['jaccard'], 4)} |")
    lines += intervals_tables(summary) + pass_table(summary) + grid_table(summary)
    lines += ["", "## State locality (logged by every trainer every --locality-every steps, 10 by default)", "",
              paragraph(locality), "",
              "| run | state source | signal | state NLL under base | target NLL start | target NLL end |",
              "| --- | --- | --- | --- | --- | --- |"]
    lines += ["| " + " | ".join([row["label"], row["states"], row["signal"], *map(fmt, row["locality"].values())])
              + " |" for row in models.values() if "locality" in row]   # state NLL under base, target NLL start, end
    lines += ["", "## The paper's conditions: is this the paper's experiment?", "",
              paragraph(conditions), ""]
    lines += [paragraph(report, 3, **summary["multiplicity"]), ""]

    def parts(decision):   # each difference with its interval, the verdict read from it, its p raw and Holm-adjusted
        return "; ".join(f"{q['difference']} {ci(q['interval'], q['digits'])} {q['verdict']}" +
                         (f" (p {q['p']:.2g}, Holm {q['p_holm']:.2g})" if "p_holm" in q else "") for q in decision["parts"])

    def holm(decision):
        return f" (Holm: **{decision['verdict_holm']}**)" if "verdict_holm" in decision else ""

    for key, c in summary.get("conditions", {}).items():
        lines.append(f"- **{key}**: **{c['verdict']}**{holm(c)} ({parts(c)})")
    lines += ["", "## The paper's predictions, decided from intervals", "",
              paragraph(predictions, 1),
              "", paragraph(predictions, 2, similar=SIMILAR), ""]
    for key, p in summary["predictions"].items():
        extra = ""
        if "margin" in p:
            control = p.get("control")
            extra = f"; margin ±{p['margin']:.5f}" + (f"; control: {control['difference']} "
                                                        f"{ci(control['interval'], 5)} {control['verdict']}" if control else "")
        lines.append(f"- **{key}** {p['claim']}: **{p['verdict']}**{holm(p)} ({parts(p)}{extra})")
    lines += ["", "## Plots", ""] + [f"![{os.path.splitext(p)[0]}]({p})" for p in plots]
    lines += cost_table(summary["costs"])
    path = os.path.join(out_dir, "results.md")
    write_text(path, "\n".join(lines) + "\n")
    return path


def ci(iv: dict | None, digits: int = 3, signed: bool = True) -> str:
    """An estimate with its 95% interval: +0.012 [+0.003, +0.021] (a difference), 0.990 [0.981, 0.998] (a ratio)."""
    if iv is None:
        return "–"
    f = f"{'+' if signed else ''}.{digits}f"
    return f"{iv['estimate']:{f}} [{iv['ci95'][0]:{f}}, {iv['ci95'][1]:{f}}]"


def intervals_tables(summary: dict) -> list[str]:
    """results.md's tables of differences from the base, policy KLs, correlations and retention at matched gain.

    Paired over the same items; t-intervals over seeds with the items' variance added (study.stats.studentized: SE² =
    the item bootstrap's variance ({bootstrap} resamples) + the per-seed values' variance / S, t with S - 1 degrees of
    freedom when the seeds' part leads, else Satterthwaite's). The base's standard errors (lm-evaluation-harness's
    sample std / √n): {stderr}.

    KL(π0‖π) at the base's own rollout states (RL's Razor's quantity), KL(π‖π0) at the post-trained policy's; target:
    the GSM8K drift prompts, retention: TruthfulQA and MMLU contexts.

    Correlation of each measure with the mean forgetting F across all trained runs and seeds ({points} points):
    Pearson's r with its 95% interval resampled by method (a method's seeds are one cluster, not independent points),
    its range with each method left out, the partial r on the run's GSM8K accuracy (does it track forgetting beyond
    how far the target moved?), resampled by method; last, r and Spearman's ρ resampling the points as if independent
    (intervals too narrow).

    Each method's mean retention R where its trajectory (base, {fractions} and all of its steps) first reaches a GSM8K
    gain over the base ({base:.3f}), linear between points, and its difference from the first method in the list that
    reaches the same gain, paired over items and seeds; 95% intervals. *Unreached*: the share of item resamples in
    which the curve never reaches the gain (they carry no R); *seeds*: how many seeds' own curves reach it (one of
    several: no interval). † marks a gain the method reaches between the base and its first snapshot: there R is one
    straight segment from the base, not a measured point."""
    models = {k: v for k, v in summary["models"].items() if "intervals" in v}
    base = summary["models"]["base"]
    out = ["", "## Differences from the base, with 95% intervals", "",
           paragraph(intervals_tables, 1, bootstrap=BOOTSTRAP, stderr=", ".join(
               f"{t} {base[t]['mean']:.3f} ± {v:.3f}" for t, v in base["stderr"].items())), "",
           "| model | Δ GSM8K | Δ TruthfulQA MC1 | Δ TruthfulQA MC2 | Δ MMLU | mean forgetting F | mean retention R |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in models.values():
        iv = row["intervals"]
        out.append(f"| {row['label']} | " + " | ".join(ci(iv[f"gain_{t}"]) for t in TASK_KEYS) +
                   f" | {ci(iv['forgetting'])} | {ci(iv['retention'], signed=False)} |")
    kls = [k for k in MEASURES if k.startswith("kl") and any(k in r.get("measures", {}) for r in models.values())]
    if kls:
        out += ["", "## Policy KL (drift.py): per token, exact over the vocabulary, mean over states and prompts", "",
                paragraph(intervals_tables, 2), "",
                "| model | " + " | ".join(MEASURES[k] for k in kls) + " |", "| --- |" + " --- |" * len(kls)]
        for row in models.values():
            out.append(f"| {row['label']} | " + " | ".join(fmt(row["measures"].get(k), 4) for k in kls) + " |")
    if summary["correlations"]:
        out += ["", "## Which drift measure tracks forgetting", "",
                paragraph(intervals_tables, 3, points=len(summary["points"])), "",
                "| measure | Pearson r, by method | leave one method out | partial r on GSM8K | R² | r, points "
                "independent | Spearman ρ, points independent |", "| --- |" + " --- |" * 6]
        for k, c in summary["correlations"].items():
            loo = list(c.get("leave_one_method_out", {}).values())
            out.append(f"| {MEASURES[k]} | {ci(c.get('pearson_by_method'), 2)} | "
                       + (f"{min(loo):+.2f} to {max(loo):+.2f}" if loo else "–") + f" | {ci(c.get('partial'), 2)} | "
                       f"{c['pearson'].get('r2', float('nan')):.2f} | {ci(c['pearson'], 2)} | {ci(c['spearman'], 2)} |")
    fr = summary.get("frontier")
    if fr and fr["matched"]:
        labels = {n: summary["models"][n]["label"] for n in fr["curves"]}
        out += ["", "## Retention at matched target gain (--frontier)", "",
                paragraph(intervals_tables, 4, fractions=", ".join(f"{f:g}" for f in FRONTIER), base=fr["base_gsm8k"]),
                "",
                "| gain | method | R | difference | against | unreached | seeds |", "| --- |" + " --- |" * 6]
        for gain, cells in fr["matched"].items():
            for n, c in cells.items():
                d = c.get("difference")
                out.append(f"| {gain} | {labels[n]}{' †' * c['from_base']} | {ci(c, signed=False)} | {ci(d)} | "
                           f"{labels[d['against']] if d else '–'} | {c['unreached']:.0%} | {c['seeds_defined']} of {c['seeds']} |")
    return out


def pass_table(summary: dict) -> list[str]:
    """GSM8K pass@k of every model, by Chen et al. (2021)'s unbiased estimator (the greedy accuracy of Table 2 stays
    the target score). A method that teaches new solutions raises pass@k at every k; one that sharpens what the base
    could already sample raises pass@1 and not pass@k at the largest k. Δ: against the base, paired over problems,
    with a 95% interval. From n = {samples} samples per problem at temperature {temperature} on the first {problems}
    test problems."""
    models = {k: v for k, v in summary["models"].items() if "pass_at_k" in v}
    if "base" not in models:
        return ["", "## pass@k on GSM8K", "", "Not run: `reproduce.py --variants` runs it."]
    ks = list(models["base"]["pass_at_k"])
    out = ["", "## pass@k on GSM8K (evaluate.py --samples)", "",
           paragraph(pass_table, **summary["pass_protocol"]), "",
           "| model | " + " | ".join(f"pass@{k}" for k in ks) + " | " + " | ".join(f"Δ pass@{k}" for k in (ks[0], ks[-1])) + " |",
           "| --- |" + " --- |" * (len(ks) + 2)]
    for row in models.values():
        iv = row.get("pass_intervals", {})
        out.append(f"| {row['label']} | " + " | ".join(fmt(row["pass_at_k"][k]) for k in ks) + " | " +
                   " | ".join(ci(iv.get(f"gsm8k_pass@{k}")) for k in (ks[0], ks[-1])) + " |")
    return out


def grid_table(summary: dict) -> list[str]:
    """Every trained run in its cell, with its GSM8K gain over the base and its mean retention R (the intervals are
    in the tables above); · = a cell no run fills."""
    runs = [(name, row) for name, row in summary["models"].items() if name != "base"]
    order = ["dataset", "learner", "teacher", "gold tokens", "own correct samples", "teacher continuation", "exact KL",
             "sampled KL", "exact-answer reward"]            # dense signals first, the sparse reward last
    rank = lambda x: order.index(x) if x in order else len(order)   # noqa: E731
    sources = sorted(dict.fromkeys(row["states"] for _, row in runs), key=rank)
    signals = sorted(dict.fromkeys(row["signal"] for _, row in runs), key=rank)

    def cell(source, signal):
        return "<br>".join(f"{row['label']}: Δ {row['intervals']['gain_gsm8k']['estimate']:+.3f}, "
                           f"R {row['intervals']['retention']['estimate']:.3f}" if "intervals" in row else row["label"]
                           for _, row in runs if row["states"] == source and row["signal"] == signal) or "·"
    out = ["", "## The two axes: state source x signal", "",
           paragraph(grid_table), "",
           "| state source \\ signal | " + " | ".join(signals) + " |", "| --- |" + " --- |" * len(signals)]
    out += [f"| {source} | " + " | ".join(cell(source, signal) for signal in signals) + " |" for source in sources]
    if summary.get("state_sources"):      # the variants' runs on teacher and dataset states (reproduce.py --variants)
        out += ["", paragraph(state_sources).replace("(runs: study.stages.Stage) ", ""), "",
                "| run (states) | against (states) | Δ GSM8K | within ±b | Δ R | within ±b |", "| --- |" + " --- |" * 5]
    for name, c in summary.get("state_sources", {}).items():
        a, b = summary["models"][name], summary["models"][c["against"]]
        out.append(f"| {a['label']} ({a['states']}) | {b['label']} ({b['states']}) | " + " | ".join(
            f"{ci(c[k])} | {max(map(abs, c[k]['ci90'])):.3f}" for k in ("gsm8k", "retention")) + " |")
    return out


def cost_table(costs: dict) -> list[str]:
    """Seconds per run and stage kind (per seed, averaged), and the peak GPU memory: what a study costs."""
    seconds, memory = costs["seconds"], costs["peak_gpu_gib"]
    if not seconds:
        return ["", "No stage's cost was measured (each was reused from a study that recorded none)."]
    total, seeds, peak = {}, {}, {}
    for key, sec in seconds.items():
        kind, name = key.split("/", 1)     # train/grpo_s0, evaluate/grpo_s0, evaluate/grpo_s0_at10, drift/grpo_s0_lexical,
                                           # passk/grpo_s0
        if kind == "drift":
            name = name.rsplit("_", 1)[0]
        elif "_at" in name:                # a --frontier snapshot
            kind, name = "frontier", name.rsplit("_at", 1)[0]
        run, _, seed = name.rpartition("_s") if name != "base" else ("base", "", "0")
        total[(run, kind)] = total.get((run, kind), 0.0) + sec
        seeds.setdefault(run, set()).add(seed)
        peak[run] = max(peak.get(run, 0.0), memory.get(key, 0.0))
    kinds = ["train", "evaluate", "drift"] + [k for k in ("passk", "frontier") if any(kind == k for _, kind in total)]
    out = ["", f"## Cost ({sum(seconds.values()) / 60:.1f} min of stages, each measured when it ran)", "",
           "Wall seconds per seed (drift: all feature sets; frontier: evaluating the run's snapshots)" +
           ("; peak GPU memory, GiB." if memory else "."), "",
           "| run | " + " | ".join(f"{k} s" for k in kinds) + " |" + (" peak GPU GiB |" if memory else ""),
           "| --- |" + " --- |" * len(kinds) + (" --- |" if memory else "")]
    for run in seeds:
        cells = [f"{total[(run, k)] / len(seeds[run]):.0f}" if (run, k) in total else "–" for k in kinds]
        out.append(f"| {run} | " + " | ".join(cells) + " |" + (f" {peak[run]:.1f} |" if memory else ""))
    return out


def ema(values: list, span: float | None = None) -> list:
    """Exponential moving average, decay 1 - 2 / (span + 1) with span a tenth of the run by default,
    bias-corrected so that the first steps are not pulled toward zero: the trend a curve's noise hides."""
    span = span or max(2.0, len(values) / 10)
    decay, avg, out = 1 - 2 / (span + 1), 0.0, []
    for t, v in enumerate(values, 1):
        avg = decay * avg + (1 - decay) * v
        out.append(avg / (1 - decay ** t))
    return out


def plot(summary: dict, out_dir: str) -> list[str]:
    """training_curves.png (each run's loss or reward per step, with its moving average, and --eval-every's validation
    accuracy dashed), retention_vs_drift.png and
    (--frontier) frontier.png; returns their names."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    plots = []

    def grid(n, cols, width, height):   # n panels in rows of `cols`, the spare ones blank
        rows = -(-n // cols) or 1
        fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        return fig, list(axes.flat)

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=110)
        plt.close(fig)
        plots.append(name)

    trained = {k: v for k, v in summary["models"].items() if k != "base"}
    curves = {s.name: s.curve for s in stages()}
    fig, axes = grid(len(trained), 4, 4.0, 3.5)
    for ax, (name, row) in zip(axes, trained.items()):
        key, val = curves.get(name, "loss"), None
        for r, color in zip(row["runs"], ("C0", "C1", "C2", "C3", "C4")):
            log = read_log(r["log"])
            x, y = [e["step"] for e in log if key in e], [e[key] for e in log if key in e]
            ax.plot(x, y, color=color, lw=0.6, alpha=0.25)       # every step, faint: mostly noise
            ax.plot(x, ema(y), color=color, lw=1.8, label=f"seed {r['seed']}" if "seed" in r else None)
            points = [(e["step"], e["val_accuracy"]) for e in log if "val_accuracy" in e]   # --eval-every
            if points:
                val = val or ax.twinx()
                val.plot(*zip(*points), color=color, ls="--", marker=".", lw=1.0)
                val.set_ylabel("validation accuracy (dashed)", fontsize=8)
        ax.set_title(row["label"], fontsize=9)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(CURVE_LABELS.get(key, key), fontsize=8)
        if len(row["runs"]) > 1:
            ax.legend(fontsize=7)
    save(fig, "training_curves.png")

    keys = [k for k in MEASURES if k in summary["correlations"]]
    fig, axes = grid(len(keys), min(3, len(keys)) or 1, 5.5, 4.2)
    runs = list(dict.fromkeys(p["run"] for p in summary["points"]))
    for ax, key in zip(axes, keys):
        for name, marker in zip(runs, "osD^v<>pPX*h"):
            pts = [p for p in summary["points"] if p["run"] == name]
            ax.plot([p[key] for p in pts], [p["retention"] for p in pts], marker, alpha=0.8, label=summary["models"][name]["label"])
        c = summary["correlations"][key]
        ax.set_title(f"{MEASURES[key]}: Pearson r with F {ci(c.get('pearson_by_method', c['pearson']), 2)}"
                     + (" (by method)" if "pearson_by_method" in c else ""), fontsize=9)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel(MEASURES[key] + (" (nats per token)" if key.startswith("kl") else ""))
        ax.set_ylabel("mean retention ratio (post / base)")
    if keys:
        axes[0].legend(fontsize=6)
    save(fig, "retention_vs_drift.png")
    if summary.get("frontier", {}).get("curves"):
        fig, ax = plt.subplots(figsize=(8, 5.5))
        for (name, c), color in zip(summary["frontier"]["curves"].items(), [f"C{i}" for i in range(10)]):
            for acc, ret in zip(c["per_seed"]["gsm8k"], c["per_seed"]["retention"]):
                ax.plot(acc, ret, "o", color=color, alpha=0.3, ms=4)
            ax.plot(c["gsm8k"], c["retention"], "-o", color=color, lw=1.5, ms=5, label=summary["models"][name]["label"])
        ax.axvline(summary["frontier"]["base_gsm8k"], color="grey", lw=0.5)
        ax.axhline(1.0, color="grey", lw=0.5)
        ax.set_xlabel("GSM8K accuracy (target)")
        ax.set_ylabel("mean retention ratio (post / base)")
        ax.set_title(f"Each run after {', '.join(map(str, FRONTIER))} and all of its steps (faint: one seed; line: "
                     "the mean, from the base)", fontsize=9)
        ax.legend(fontsize=7)
        save(fig, "frontier.png")
    return plots
