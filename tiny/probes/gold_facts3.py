"""The third world's base probes (issue 37) on a validation split: accuracy, accuracy with the facts given, skill share,
per-step arithmetic, pass@k with the facts given on the rare kinds, and the retention validation scores.

    OMP_NUM_THREADS=1 python tiny/probes/gold_facts3.py --out tiny/probes/results/world3/base.json
    OMP_NUM_THREADS=1 python tiny/probes/gold_facts3.py --checkpoint ckpt/w3_mild/final.pt --baseline base.json --out mild.json

Adapted from ../shared/probes/gold_facts.py (world 2's layout) to tiny/world3.py: the problem kinds come from
gsm8k/kinds.json, the retention items from truthfulqa/validation.json and mmlu/validation/, never the evaluated ones.
- accuracy: greedy, evaluate.py's prompt, stop and scoring.
- facts given: the gold solution's recall lines (the canonical sentences of the facts it needs) put after
  "Answer:", the model writes the rest. skill share = (1 - facts given) / (1 - accuracy), its 95% interval from a
  paired bootstrap over the problems (the same resampled problems in both).
- first wrong step of each wrong answer, as in gold_facts.py (recall / plan / arithmetic / final).
- arithmetic per step: teacher-forced on the gold solutions (the result's tokens all argmax), plain (annotations
  removed) and inside the annotation.
- pass@k with the facts given, on the rare kinds' problems (17-20): k samples at temperature 1, seed --seed (the study
  uses seeds 0-4; the probes 137); its gain over greedy with the facts given, a paired 95% interval.
- retention: TruthfulQA MC1/MC2 and MMLU (0-shot) on the validation items; with --baseline, R (Eq. 12: the mean of
  MC1's and MMLU's ratios to the baseline's) and the target's paired gain with 95% intervals.
"""
import argparse, collections, contextlib, json, math, os, random, re, sys, time
sys.path.insert(0, os.getcwd())
import torch
import lora
from model import load_model
from generate import generate
from evaluate import (GSM8K_STOP, eval_mmlu, eval_truthfulqa, gsm8k_prompt, is_correct, load_gsm8k, load_mmlu,
                      load_truthfulqa)

p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
p.add_argument("--model", default="tiny/probes/third/model", help="model directory")
p.add_argument("--data-dir", default="tiny/probes/third/data", help="tiny/world3.py's output")
p.add_argument("--checkpoint", help="a LoRA checkpoint to merge into the model (an SFT probe)")
p.add_argument("--baseline", help="this probe's output for the base: adds the gains, R and their intervals")
p.add_argument("--split", default="validation", help="GSM8K split (the probes read validation only)")
p.add_argument("--n", type=int, default=0, help="first N problems (0: all)")
p.add_argument("--samples", type=int, default=8, help="k of pass@k with the facts given, on the rare kinds")
p.add_argument("--seed", type=int, default=137, help="sampling and bootstrap seed (not one of the study's)")
p.add_argument("--tf-n", type=int, default=300, help="gold solutions teacher-forced for per-step arithmetic")
p.add_argument("--threads", type=int, default=1)
p.add_argument("--out", required=True)
args = p.parse_args()
torch.set_num_threads(args.threads)
t0 = time.time()
model, tok = load_model(args.model)
if args.checkpoint:
    lora.load_adapter(model, args.checkpoint)
D = args.data_dir
rows = load_gsm8k(args.split, D)
kinds = json.load(open(os.path.join(D, "gsm8k", "kinds.json")))[args.split]
rows, kinds = rows[:args.n or None], kinds[:args.n or None]
RARE = 17   # kinds 17-20 are tiny/world3.py's rare ones

deann = lambda s: re.sub(r"<<[^>]*>>", "", s)
FACT = re.compile(r"^([A-Z][a-z]+ [A-Z][a-z]+) (is (\d+) years old|earns \$(\d+) an hour|keeps (\d+) hens)\.$")
STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = \$?(\d+)")


def parse_fact(line):
    m = FACT.match(line.strip())
    return (m[1], "age" if m[3] else "wage" if m[4] else "hens", int(m[3] or m[4] or m[5])) if m else None


def parse_step(line):
    m = STEP.search(line)
    return (int(m[1]), m[2], int(m[3]), int(m[4])) if m else None


def first_wrong(gold, comp):
    """Where a wrong completion first leaves the gold solution (gold_facts.py's rule, canonical fact sentences)."""
    gl, cl = deann(gold).strip().split("\n"), deann(comp).strip().split("\n")
    for i, g in enumerate(gl):
        c = cl[i].strip() if i < len(cl) else ""
        if g.startswith("####"):
            return "final"
        if c == g:
            continue
        fg, fc = parse_fact(g), parse_fact(c)
        if fg:
            return "recall" if fc and fc[:2] == fg[:2] else "plan"
        sg, sc = parse_step(g), parse_step(c)
        if sg and sc and sc[:3] == sg[:3]:
            if sc == sg:
                continue
            return "arithmetic"
        return "plan"
    return "final"


def interval(diffs):
    """Mean and 95% normal interval of per-item values (paired differences)."""
    n, m = len(diffs), sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - m) ** 2 for d in diffs) / max(n - 1, 1) / n)
    return [round(m, 4), round(m - 1.96 * se, 4), round(m + 1.96 * se, 4)]


def complete(prompts, temperature=0.0, seed=0):
    return generate(model, tok, prompts, max_new_tokens=256, temperature=temperature, stop=GSM8K_STOP, seed=seed,
                    batch_size=64)


ctx = lora.merged(model) if args.checkpoint else contextlib.nullcontext()
with ctx, torch.no_grad():
    # accuracy, and accuracy with the facts given
    greedy = complete([gsm8k_prompt(r["question"]) for r in rows])
    ok = [int(is_correct(g.text, r["answer"])) for g, r in zip(greedy, rows)]
    given = [gsm8k_prompt(r["question"]) + " " + "\n".join(l for l in deann(r["answer"]).split("\n") if parse_fact(l))
             + "\n" for r in rows]
    given_out = complete(given)
    ok_given = [int(is_correct(g.text, r["answer"])) for g, r in zip(given_out, rows)]
    # pass@k with the facts given on the rare kinds
    rare = [i for i, k in enumerate(kinds) if k >= RARE]
    sampled = complete([given[i] for i in rare for _ in range(args.samples)], temperature=1.0, seed=args.seed)
    pass_k = [int(any(is_correct(s.text, rows[i]["answer"]) for s in sampled[j * args.samples:(j + 1) * args.samples]))
              for j, i in enumerate(rare)]
    # per-step arithmetic, teacher-forced on the gold solutions
    tf = {"plain": [0, 0], "annotated": [0, 0]}
    ANN = re.compile(r"\d+ [-+*/] \d+ = \$?<<\d+ [-+*/] \d+ = (\d+)>>\d+")
    for r in rows[:args.tf_n]:
        for style, rx in (("plain", STEP), ("annotated", ANN)):
            text = gsm8k_prompt(r["question"]) + " " + (r["answer"] if style == "annotated" else deann(r["answer"]))
            enc = tok.tok.encode(text, add_special_tokens=False)
            pred = model(torch.tensor([enc.ids]))[0].argmax(-1)
            for m in rx.finditer(text):
                g = 4 if style == "plain" else 1
                a, b = m.start(g), m.end(g)
                toks = [i for i, (s, e) in enumerate(enc.offsets) if s < b and e > a]
                tf[style][0] += all(int(pred[i - 1]) == enc.ids[i] for i in toks)
                tf[style][1] += 1
    # retention on the validation items
    tq, tq_recs = eval_truthfulqa(model, tok, load_truthfulqa(D, "validation.json"), progress=False)
    mm, mm_recs = eval_mmlu(model, tok, load_mmlu("validation", D), progress=False)

n = len(rows)
acc, acc_given = sum(ok) / n, sum(ok_given) / n
rng = random.Random(args.seed)
shares = []
for _ in range(2000):   # paired bootstrap of the skill share
    idx = [rng.randrange(n) for _ in range(n)]
    wrong = sum(1 - ok[i] for i in idx)
    shares.append(sum(1 - ok_given[i] for i in idx) / wrong if wrong else float("nan"))
shares.sort()
by_kind = collections.defaultdict(lambda: [0, 0, 0])
for k, a, b in zip(kinds, ok, ok_given):
    by_kind[k][0] += a
    by_kind[k][1] += b
    by_kind[k][2] += 1
out = {"model": args.model, "checkpoint": args.checkpoint, "data_dir": D, "split": args.split, "n": n,
       "seed": args.seed, "accuracy": round(acc, 4), "facts_given_accuracy": round(acc_given, 4),
       "skill_share": round((1 - acc_given) / (1 - acc), 4),
       "skill_share_95": [round(shares[49], 4), round(shares[1949], 4)],
       "first_wrong_step": dict(collections.Counter(first_wrong(r["answer"], g.text)
                                                     for r, g, o in zip(rows, greedy, ok) if not o)),
       "first_wrong_step_facts_given": dict(collections.Counter(
           first_wrong(r["answer"], " " + "\n".join(l for l in deann(r["answer"]).split("\n") if parse_fact(l))
                       + "\n" + g.text) for r, g, o in zip(rows, given_out, ok_given) if not o)),
       "first_wrong_step_facts_given_by_kind": {k: dict(collections.Counter(
           first_wrong(r["answer"], " " + "\n".join(l for l in deann(r["answer"]).split("\n") if parse_fact(l))
                       + "\n" + g.text) for r, g, o, kk in zip(rows, given_out, ok_given, kinds) if not o and kk == k))
           for k in sorted(set(kinds))},
       "by_kind": {k: {"n": v[2], "accuracy": round(v[0] / v[2], 3), "facts_given": round(v[1] / v[2], 3)}
                   for k, v in sorted(by_kind.items())},
       "rare": {"n": len(rare), "accuracy": round(sum(ok[i] for i in rare) / len(rare), 4),
                "facts_given_greedy": round(sum(ok_given[i] for i in rare) / len(rare), 4),
                f"facts_given_pass@{args.samples}": round(sum(pass_k) / len(rare), 4),
                "gain_95": interval([pk - ok_given[i] for pk, i in zip(pass_k, rare)]),
                "by_kind": {k: {"n": sum(kinds[i] == k for i in rare),
                                "facts_given_greedy": round(sum(ok_given[i] for i in rare if kinds[i] == k)
                                                            / sum(kinds[i] == k for i in rare), 3),
                                f"facts_given_pass@{args.samples}": round(sum(pk for pk, i in zip(pass_k, rare)
                                                                              if kinds[i] == k)
                                                                          / sum(kinds[i] == k for i in rare), 3)}
                            for k in sorted({kinds[i] for i in rare})}},
       "common": {"n": n - len(rare), "accuracy": round(sum(ok[i] for i in range(n) if kinds[i] < RARE) / (n - len(rare)), 4),
                  "facts_given": round(sum(ok_given[i] for i in range(n) if kinds[i] < RARE) / (n - len(rare)), 4)},
       "teacher_forced_arithmetic": {k: {"correct": round(v[0] / v[1], 4), "n": v[1]} for k, v in tf.items()},
       "truthfulqa_validation": {"mc1": round(tq["mc1"], 4), "mc2": round(tq["mc2"], 4), "n": len(tq_recs)},
       "mmlu_validation": {"score": round(mm["score"], 4), "n": len(mm_recs)},
       "per_item": {"gsm8k": ok, "gsm8k_facts_given": ok_given, "truthfulqa_mc1": [int(r["correct"]) for r in tq_recs],
                    "mmlu": [int(r["correct"]) for r in mm_recs]}}
if args.baseline:
    base = json.load(open(args.baseline))
    b = base["per_item"]
    out["gain_95"] = interval([a - c for a, c in zip(ok, b["gsm8k"])])
    out["gain_facts_given_95"] = interval([a - c for a, c in zip(ok_given, b["gsm8k_facts_given"])])
    t, m = out["per_item"]["truthfulqa_mc1"], out["per_item"]["mmlu"]
    R = lambda ti, mi: (sum(t[i] for i in ti) / max(sum(b["truthfulqa_mc1"][i] for i in ti), 1)
                        + sum(m[i] for i in mi) / max(sum(b["mmlu"][i] for i in mi), 1)) / 2
    Rs = sorted(R([rng.randrange(len(t)) for _ in t], [rng.randrange(len(m)) for _ in m]) for _ in range(2000))
    out["R"] = round(R(range(len(t)), range(len(m))), 4)
    out["R_95"] = [round(Rs[49], 4), round(Rs[1949], 4)]
out["seconds"] = round(time.time() - t0, 1)
os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
json.dump(out, open(args.out, "w"), indent=1)
print(json.dumps({k: v for k, v in out.items() if k != "per_item"}, indent=1))
