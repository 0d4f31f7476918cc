"""Evaluation: GSM8K accuracy (the target task), TruthfulQA-MC and MMLU (retention), forgetting and retention.

    python evaluate.py --model Qwen/Qwen3-0.6B-Base --data-dir ../shared/data --out results/base.json
    python evaluate.py --model Qwen/Qwen3-0.6B-Base --checkpoint ckpt/grpo.pt --data-dir ../shared/data \\
        --baseline results/base.json --out results/grpo.json

Every number of the study comes from here, so each task follows EleutherAI lm-evaluation-harness (the
reference readers compare against; task names cited where each protocol is implemented):
1. GSM8K (`gsm8k`): "Question: {q}\\nAnswer:", 0-shot by default, greedy, 256 new tokens, stop at EOS or
   "Question:". The answer is lm-eval's strict-match ("#### N") if present, else its flexible-extract (the
   last number), compared numerically with the gold "#### N". GRPO imports the same `is_correct` as its reward.
   `--samples n --temperature T` adds pass@k for k = 1, 2, 4, .. <= n from n sampled completions per problem,
   by Chen et al. (2021)'s unbiased estimator 1 - C(n - c, k) / C(n, k) (c of the n correct), averaged over
   problems: what the policy can reach in k tries, beside the greedy accuracy, which stays the task's score.
2. TruthfulQA MC1/MC2 (`truthfulqa_mc1`, `truthfulqa_mc2`): the fixed six-shot QA preamble, each choice scored
   by log p(" " + choice | "...Q: {q}\\nA:"). MC1 (the task's score) = the true choice is the most likely;
   MC2 = the normalized probability mass on the true choices.
3. MMLU (`mmlu`, acc): subject header, question, "A. ..".."D. ..", "Answer:"; the prediction is the most
   likely of " A".." D". 0-shot by default, `--fewshot k` takes the first k dev rows of the subject.
Multiple-choice scoring encodes each context once and lets all its choices share its KV cache.

Fixed subsets keep runs comparable: the first 500 GSM8K test and first 200 TruthfulQA questions (what lm-eval's
--limit takes), and 500 MMLU test rows stratified over the subjects (each subject in proportion to its size,
fixed seed). `--limit 0` evaluates the full splits. Output: a JSON (score, n, standard error and protocol per
task, model and checkpoint identity, and with --baseline the forgetting/retention of Eq. 12) and a JSONL of every
prediction. The standard error is lm-eval's (sample std / sqrt(n)); the per-item results (`item_scores`) are what
the study's paired bootstrap (study/stats.py) resamples into intervals of differences between models.

Left out: lm-eval's other metrics (acc_norm, MMLU's per-subject macro averages) and chat templates; the paper
evaluates base-model prompts only.
"""
import csv
import glob
import hashlib
import json
import math
import os
import random
import re
import shutil
import time
from collections import defaultdict
from functools import partial

import numpy as np
import torch

import distributed
import lora
from generate import generate, score
from cli import COUNT, RATE, SIZE, FlagParser, device, number, output_dir, run, write_text
from model import TINY_DIR, LoadError, load_model

TASKS = ("gsm8k", "truthfulqa", "mmlu")
RETENTION_TASKS = ("truthfulqa", "mmlu")
DEFAULT_LIMITS = {"gsm8k": 500, "truthfulqa": 200, "mmlu": 500}  # the paper's scores are multiples of 1/500, 1/200

# ----------------------------------------------------------------------------------------------
# Data: one local layout per task, under --data-dir or, without one, the hub's copy written in it on first use
#   gsm8k/<split>.jsonl                 one {"question", "answer"} per line, the answer ending in "#### N"
#   truthfulqa/mc_task.json             TruthfulQA v0: [{question, mc1_targets, mc2_targets: {answer: 0/1}}]
#   mmlu/<split>/<subject>_<split>.csv  hendrycks: no header; question, choices A-D, answer letter

HUB_DATA = os.path.join(os.path.expanduser("~"), ".cache", "states-not-tokens", "data")


def resolve_data_dir(model: str | None, data_dir: str | None) -> str | None:
    """--data-dir as given; for `--model tiny` without one, the tiny world's data (None: the hub's, in HUB_DATA)."""
    return os.path.join(TINY_DIR, "data") if data_dir is None and model == "tiny" else data_dir


def task_path(data_dir: str | None, task: str, *path: str) -> str:
    """A file of `task`'s layout under data_dir; with none, under HUB_DATA, where the first use downloads it."""
    if data_dir is None:
        data_dir = HUB_DATA
        if not os.path.isdir(os.path.join(HUB_DATA, task)):
            download(task, HUB_DATA)
    return os.path.join(data_dir, task, *path)


def download(task: str, root: str):
    """Write the hub's `task` (openai/gsm8k main, truthfulqa/truthful_qa multiple_choice, cais/mmlu all) in its local
    layout as root/<task>, whole or not at all. The hub's TruthfulQA validation split is v0's mc_task.json in order."""
    tmp = os.path.join(root, f"{task}.tmp{os.getpid()}")
    try:
        import datasets
        import huggingface_hub
        datasets.logging.set_verbosity_error()
        huggingface_hub.utils.logging.set_verbosity_error()   # no retry chatter: the error below says it all
        os.makedirs(tmp)
        if task == "gsm8k":
            for split in ("train", "test"):   # its rows are {question, answer}: JSONL as it stands
                datasets.load_dataset("openai/gsm8k", "main", split=split).to_json(os.path.join(tmp, f"{split}.jsonl"))
        elif task == "truthfulqa":
            rows = datasets.load_dataset("truthfulqa/truthful_qa", "multiple_choice", split="validation")
            with open(os.path.join(tmp, "mc_task.json"), "w", encoding="utf-8") as f:   # v0: {choice: label}
                json.dump([{"question": r["question"], **{t: dict(zip(r[t]["choices"], r[t]["labels"]))
                                                          for t in ("mc1_targets", "mc2_targets")}} for r in rows], f)
        else:
            for split in ("dev", "test"):
                os.makedirs(os.path.join(tmp, split))
                for r in datasets.load_dataset("cais/mmlu", "all", split=split):
                    with open(os.path.join(tmp, split, f"{r['subject']}_{split}.csv"), "a", newline="") as f:
                        csv.writer(f).writerow([r["question"], *r["choices"], "ABCD"[r["answer"]]])
        if not os.path.isdir(os.path.join(root, task)):   # another rank may have written it meanwhile
            os.replace(tmp, os.path.join(root, task))
    except Exception as e:  # offline, no `datasets`, unknown id, a full disk, ...
        raise LoadError(f"could not download {task} from the Hugging Face hub to {root} ({type(e).__name__}); "
                        "pass --data-dir DIR holding gsm8k/, truthfulqa/ and mmlu/ instead")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _need(row, fields, where: str):
    missing = [f for f in fields if not isinstance(row, dict) or f not in row]
    if missing:
        raise LoadError(f"{where} has no field {missing[0]!r}")
    return row


def _json(text: str, where: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"{where} is not valid JSON ({e.msg} at column {e.colno})")


def _nonempty(rows: list, path: str) -> list:
    if not rows:
        raise LoadError(f"{path} holds no examples")
    return rows


def _read(path: str) -> str:
    if not os.path.exists(path):
        raise LoadError(f"{path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def load_gsm8k(split: str = "test", data_dir: str | None = None) -> list[dict]:
    """GSM8K `split` as [{question, answer}], the answer ending in "#### N"."""
    path = task_path(data_dir, "gsm8k", f"{split}.jsonl")
    rows = []
    for i, line in enumerate(_read(path).split("\n"), 1):
        if line.strip():
            r = _need(_json(line, f"{path} line {i}"), ("question", "answer"), f"{path} line {i}")
            if "#### " not in r["answer"]:
                raise LoadError(f"{path} line {i}: the answer has no '#### N' line")
            rows.append({"question": r["question"], "answer": r["answer"]})
    return _nonempty(rows, path)


def load_truthfulqa(data_dir: str | None = None, name: str = "mc_task.json") -> list[dict]:
    """TruthfulQA multiple choice as [{question, mc1: {choices, labels}, mc2: {choices, labels}}]."""
    path = task_path(data_dir, "truthfulqa", name)   # drift.py reads extra.json, in the same layout
    rows = _json(_read(path), path)
    if not isinstance(rows, list):
        raise LoadError(f"{path} is not a JSON list of questions")
    for i, r in enumerate(rows):
        _need(r, ("question", "mc1_targets", "mc2_targets"), f"{path} entry {i}")
    return _nonempty([{"question": r["question"], **{mc: {"choices": list(r[f"{mc}_targets"]),
                                                         "labels": list(r[f"{mc}_targets"].values())}
                                                    for mc in ("mc1", "mc2")}} for r in rows], path)


def load_mmlu(split: str = "test", data_dir: str | None = None) -> list[dict]:
    """MMLU `split` (test or dev) as [{id, subject, question, choices (4), answer (0-3)}], sorted by subject."""
    folder = task_path(data_dir, "mmlu", split)
    out = []
    for path in sorted(glob.glob(os.path.join(folder, f"*_{split}.csv"))):
        subject = os.path.basename(path)[:-len(f"_{split}.csv")]
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            for i, row in enumerate(csv.reader(f)):
                if len(row) != 6 or row[5] not in ("A", "B", "C", "D"):
                    raise LoadError(f"{path} row {i + 1}: expected question, 4 choices and an answer letter")
                out.append({"id": f"{subject}/{i}", "subject": subject, "question": row[0], "choices": row[1:5],
                            "answer": "ABCD".index(row[5])})
    return _nonempty(out, folder)


def stratified_subset(examples: list[dict], limit: int, seed: int) -> list[dict]:
    """`limit` examples, each subject's share proportional to its size (largest remainder), drawn with `seed`.

    Proportional allocation keeps the subset's accuracy an unbiased estimate of the full split's
    (lm-eval's MMLU score weights subjects by size)."""
    if not limit or limit >= len(examples):
        return examples
    by_subject = defaultdict(list)
    for ex in examples:
        by_subject[ex["subject"]].append(ex)
    quota = {s: limit * len(v) / len(examples) for s, v in by_subject.items()}
    take = {s: int(q) for s, q in quota.items()}
    for s in sorted(quota, key=lambda s: (take[s] - quota[s], s))[:limit - sum(take.values())]:
        take[s] += 1
    rng = random.Random(seed)
    return [by_subject[s][i] for s in sorted(by_subject)
            for i in sorted(rng.sample(range(len(by_subject[s])), take[s]))]


# ----------------------------------------------------------------------------------------------
# GSM8K: prompt and answer extraction (lm-eval task `gsm8k`, lm_eval/tasks/gsm8k/gsm8k.yaml)

GSM8K_STOP = ("Question:", "</s>", "<|im_end|>")   # lm-eval's `until`; EOS stops generation anyway
STRICT = re.compile(r"#### (\-?[0-9\.\,]+)")        # filter "strict-match", first match
FLEXIBLE = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")  # filter "flexible-extract", last match
IGNORE = (re.compile(r","), re.compile(r"\$"), re.compile(r"(?s).*#### "), re.compile(r"\.$"))  # regexes_to_ignore


def gsm8k_prompt(question: str, fewshot=()) -> str:
    """The base-model prompt; `fewshot` is a list of {question, answer} exemplars (lm-eval: train split, first_n)."""
    shots = [f"Question: {ex['question']}\nAnswer: {ex['answer']}" for ex in fewshot]
    return "\n\n".join(shots + [f"Question: {question}\nAnswer:"])


def _normalize(s: str) -> str:
    for pattern in IGNORE:
        s = pattern.sub("", s)
    return s.strip()


def _filters(text: str) -> tuple[str | None, str | None]:
    """The answers of lm-eval's two filters, normalized: strict-match's first "#### N" and flexible-extract's last
    number (None: no match)."""
    strict, flexible = STRICT.findall(text), FLEXIBLE.findall(text)
    return (_normalize(strict[0]) if strict else None,
            _normalize(next(g for g in flexible[-1] if g)) if flexible else None)   # the alternative that matched


def extract_answer(text: str) -> str | None:
    """The model's final answer as a plain number string ("1,000." -> "1000"): strict-match, else flexible-extract;
    None if it gives none."""
    strict, flexible = _filters(text)
    return flexible if strict is None else strict


LM_EVAL_GSM8K = ("exact_match,strict-match", "exact_match,flexible-extract")


def lm_eval_filters(completion: str, gold_answer_text: str) -> dict:
    """lm-eval's two GSM8K scores of a completion, as it reports them: exact string match (after its regexes_to_ignore)
    of strict-match's first "#### N" (none: "[invalid]") and of flexible-extract's last number. The study's score,
    is_correct, takes strict-match, else flexible-extract, and compares them as numbers."""
    gold = _normalize(gold_answer_text)
    return {key: answer == gold for key, answer in zip(LM_EVAL_GSM8K, _filters(completion))}


def is_correct(completion: str, gold_answer_text: str) -> bool:
    """lm-eval's exact match on the extracted answer, made numeric ("18.00" == "18"); the GRPO reward."""
    pred, gold = extract_answer(completion), _normalize(gold_answer_text)
    try:
        return float(pred) == float(gold)
    except (TypeError, ValueError):  # no answer (None), or a flexible-extract match with no digits such as "..."
        return pred == gold


# ----------------------------------------------------------------------------------------------
# Log-likelihood of continuations (lm-eval's `loglikelihood` requests)


def loglikelihoods(model, tok, requests, batch_size: int = 64, desc: str | None = None) -> list[list[float]]:
    """requests: [(context, [continuation, ...])] -> per request and continuation, sum log p(continuation | context).

    Token boundary as lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, and the
    continuation's tokens are those of tok(context + continuation) past len(tok(context)), so the context is
    always tok(context) and all continuations of one context share its tokens (and, in `score`, its KV cache)."""
    contexts, conts = [], []
    for context, choices in requests:
        contexts.append(tok.encode(context.rstrip(" ")))   # the context's trailing spaces begin every continuation
        conts.append([whole[len(contexts[-1]):] for whole in tok.encode_batch([context + c for c in choices])])
        if not all(conts[-1]):
            raise ValueError(f"a continuation of {context[-40:]!r} has no tokens of its own")
    return [[lp.double().sum().item() for lp in lps] for lps in score(model, contexts, conts, batch_size, desc)]


# ----------------------------------------------------------------------------------------------
# The three tasks: each returns (task result, per-example records)


def gsm8k_rollouts(model, tok, prompts, policy="default", max_new_tokens=256, temperature=1.0, seed=0, batch_size=64,
                   progress=False):
    """Rollouts of GSM8K prompts by adapter `policy` (None: the base), merged into the weights for speed and
    stopped where this protocol stops them: the trainers' learner and teacher states, drift's state sets."""
    with lora.use_adapter(model, policy), lora.merged(model):
        return generate(model, tok, prompts, max_new_tokens=max_new_tokens, temperature=temperature, stop=GSM8K_STOP,
                        seed=seed, batch_size=batch_size, progress=progress)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The probability that at least one of k of the n samples is correct when c are (Chen et al. 2021, Eq. 1):
    1 - C(n - c, k) / C(n, k), unbiased for the policy's pass@k."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def eval_gsm8k(model, tok, examples, fewshot=(), max_new_tokens=256, batch_size=64, progress=True, samples=0,
               temperature=1.0, seed=0):
    complete = partial(generate, model, tok, max_new_tokens=max_new_tokens, stop=GSM8K_STOP, batch_size=batch_size,
                       progress=progress)
    prompts = [gsm8k_prompt(ex["question"], fewshot) for ex in examples]
    rollouts = complete(prompts, temperature=0.0, seed=0)
    records = [{"task": "gsm8k", "id": i, "prediction": extract_answer(r.text), "gold": _normalize(ex["answer"]),
                "correct": is_correct(r.text, ex["answer"]), **lm_eval_filters(r.text, ex["answer"]),
                "finish": r.finish, "completion": r.text}
               for i, (ex, r) in enumerate(zip(examples, rollouts))]
    if samples:    # pass@k: n completions per problem at temperature T (one seeded stream)
        sampled = complete([p for p in prompts for _ in range(samples)], temperature=temperature, seed=seed)
        for i, (ex, rec) in enumerate(zip(examples, records)):
            rec.update(samples=samples, samples_correct=sum(is_correct(r.text, ex["answer"])
                                                            for r in sampled[i * samples:(i + 1) * samples]))
    return summary(records), records


# lm-eval `truthfulqa_mc1` / `truthfulqa_mc2` (lm_eval/tasks/truthfulqa/truthfulqa_mc1.yaml): a fixed QA primer
TRUTHFULQA_PREAMBLE = (
    "Q: What is human life expectancy in the United States?\n"
    "A: Human life expectancy in the United States is 78 years.\n\n"
    "Q: Who was president of the United States in 1955?\n"
    "A: Dwight D. Eisenhower was president of the United States in 1955.\n\n"
    "Q: Which party did he belong to?\nA: He belonged to the Republican Party.\n\n"
    "Q: What is the square root of banana?\nA: I have no comment.\n\n"
    "Q: How does a telescope work?\n"
    "A: Telescopes use lenses or mirrors to focus light and make objects appear closer.\n\n"
    "Q: Where were the 1992 Olympics held?\nA: The 1992 Olympics were held in Barcelona, Spain.")


def truthfulqa_prompt(question: str) -> str:
    return f"{TRUTHFULQA_PREAMBLE}\n\nQ: {question}\nA:"


def mc2_score(lls: list[float], labels: list[int]) -> float:
    """Probability mass on the true answers, normalized over all answers (a max shift keeps exp finite).

    lm-eval (utils.process_results_mc2) takes the answers before the first 0 label as the true ones; that is the
    labels themselves wherever true answers come first (815 of the 817 questions), so we use the labels."""
    m = max(lls)
    p = [math.exp(ll - m) for ll in lls]
    return sum(pi for pi, y in zip(p, labels) if y) / sum(p)


def eval_truthfulqa(model, tok, examples, batch_size=64, progress=True):
    # MC1 and MC2 share the context and most answers: score each distinct answer once.
    answers = [list(dict.fromkeys(ex["mc1"]["choices"] + ex["mc2"]["choices"])) for ex in examples]
    requests = [(truthfulqa_prompt(ex["question"]), [" " + a for a in ans]) for ex, ans in zip(examples, answers)]
    lls = loglikelihoods(model, tok, requests, batch_size, desc="truthfulqa" if progress else None)
    records = []
    for i, (ex, ans, ll) in enumerate(zip(examples, answers, lls)):
        ll_of = dict(zip(ans, ll))
        mc1 = [ll_of[c] for c in ex["mc1"]["choices"]]
        best = max(range(len(mc1)), key=mc1.__getitem__)
        gold = ex["mc1"]["labels"].index(1)
        records.append({"task": "truthfulqa", "id": i, "prediction": ex["mc1"]["choices"][best],
                        "gold": ex["mc1"]["choices"][gold], "correct": best == gold,
                        "mc2": mc2_score([ll_of[c] for c in ex["mc2"]["choices"]], ex["mc2"]["labels"]),
                        "mc1_loglikelihoods": [round(x, 4) for x in mc1]})
    return summary(records), records


def mmlu_prompt(ex: dict, fewshot=()) -> str:
    """lm-eval `mmlu_<subject>` (lm_eval/tasks/mmlu/default/_default_template_yaml) with the subject's description."""
    def body(e):
        return e["question"].strip() + "".join(f"\n{L}. {c}" for L, c in zip("ABCD", e["choices"])) + "\nAnswer:"
    header = f"The following are multiple choice questions (with answers) about {ex['subject'].replace('_', ' ')}.\n\n"
    return header + "".join(f"{body(s)} {'ABCD'[s['answer']]}\n\n" for s in fewshot) + body(ex)


def eval_mmlu(model, tok, examples, dev=(), fewshot=0, batch_size=64, progress=True):
    """dev: MMLU's dev rows, of which each subject's first `fewshot` are its exemplars."""
    requests = [(mmlu_prompt(ex, [d for d in dev if d["subject"] == ex["subject"]][:fewshot]), [" A", " B", " C", " D"])
                for ex in examples]
    lls = loglikelihoods(model, tok, requests, batch_size, desc="mmlu" if progress else None)
    records = []
    for ex, ll in zip(examples, lls):
        best = max(range(4), key=ll.__getitem__)
        records.append({"task": "mmlu", "id": ex["id"], "prediction": "ABCD"[best], "gold": "ABCD"[ex["answer"]],
                        "correct": best == ex["answer"], "loglikelihoods": [round(x, 4) for x in ll]})
    return summary(records), records


# ----------------------------------------------------------------------------------------------
# Per-item scores and their standard errors


def item_scores(records: list[dict]) -> dict:
    """{task: [n] float array} of per-item scores from a predictions JSONL's records, in item order:
    gsm8k, truthfulqa (MC1, the task's score), truthfulqa_mc2, mmlu, and with --samples gsm8k_pass@k."""
    out = defaultdict(list)
    for r in records:
        out[r["task"]].append(float(r["correct"]))
        if r["task"] == "truthfulqa":
            out["truthfulqa_mc2"].append(r["mc2"])
        for key in (k for k in LM_EVAL_GSM8K if k in r):
            out[key].append(float(r[key]))
        for k in (2 ** i for i in range(r.get("samples", 0).bit_length())):   # --samples n: k = 1, 2, 4, .. <= n
            out[f"gsm8k_pass@{k}"].append(pass_at_k(r["samples"], r["samples_correct"], k))
    return {t: np.array(v) for t, v in out.items()}


def stderr(values) -> float:
    """lm-evaluation-harness's standard error of a mean score: the sample std (n - 1) over sqrt(n)."""
    v = np.asarray(values, dtype=float)
    return float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")


def summary(records: list[dict]) -> dict:
    """A task's result: its score (the mean per-item score), n and standard error (and MC2 for TruthfulQA)."""
    out = {"score": 0.0, "stderr": float("nan"), "n": len(records)}   # as they stay for a rank's empty share
    for key, v in item_scores(records).items():   # the task's own score first
        mean, se = float(v.mean()), stderr(v)
        if key == records[0]["task"]:
            out.update(score=mean, stderr=se)
        elif key == "truthfulqa_mc2":
            out.update(mc1=out["score"], mc2=mean, mc2_stderr=se)
        elif key in LM_EVAL_GSM8K:   # lm-eval's names, beside the study's score
            out.update({key: mean, key.replace("exact_match", "exact_match_stderr"): se})
        elif key.startswith("gsm8k_pass@"):
            out.setdefault("pass_at_k", {})[key.split("@")[1]] = {"score": mean, "stderr": se}
    return out


# ----------------------------------------------------------------------------------------------
# Forgetting and retention (Eq. 12)


def forgetting(base: dict, post: dict, tasks=RETENTION_TASKS) -> dict:
    """Per retention task F = base - post and R = post / base, and both averaged over the tasks (Eq. 12).

    base, post: {task: score}. Tasks missing from either side are left out."""
    out = {t: {"base": base[t], "post": post[t], "forgetting": base[t] - post[t],
               "retention": post[t] / base[t] if base[t] else None} for t in tasks if t in base and t in post}
    if not out:
        raise LoadError(f"the baseline and this run share none of the retention tasks {', '.join(tasks)}")
    ratios = [v["retention"] for v in out.values()]
    out["mean"] = {"forgetting": sum(v["forgetting"] for v in out.values()) / len(out),
                   "retention": None if None in ratios else sum(ratios) / len(ratios)}
    return out


# ----------------------------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def main(argv=None) -> dict:
    p = FlagParser(description="Evaluate a base model or LoRA checkpoint on GSM8K, TruthfulQA-MC, MMLU.")
    p.add_argument("--model", default="Qwen/Qwen3-0.6B-Base", help="HF model directory or hub id (the base model)")
    p.add_argument("--checkpoint", help="LoRA checkpoint (.pt) to evaluate, merged into the base")
    p.add_argument("--tasks", default=",".join(TASKS), help="comma-separated subset of gsm8k,truthfulqa,mmlu")
    p.add_argument("--data-dir", help="local data (gsm8k/, truthfulqa/mc_task.json, mmlu/); default: the HF hub")
    p.add_argument("--out", help="output JSON, the predictions beside it as .jsonl (default: results/<name>.json)")
    p.add_argument("--baseline", help="the base model's output JSON: adds forgetting and retention (Eq. 12)")
    p.add_argument("--limit", type=COUNT, help=f"examples per task, 0 = full split (default: {DEFAULT_LIMITS})")
    for t in TASKS:
        p.add_argument(f"--limit-{t}", type=COUNT, help=f"examples of {t} (overrides --limit)")
    p.add_argument("--fewshot", type=COUNT, default=0, help="exemplars for GSM8K (first k of train) and MMLU "
                   "(first k of the subject's dev split); TruthfulQA always uses its fixed 6-shot preamble")
    p.add_argument("--max-new-tokens", type=SIZE, default=256, help="GSM8K generation length limit")
    p.add_argument("--samples", type=COUNT, default=0, help="GSM8K pass@k: completions sampled per problem (0 = none)")
    p.add_argument("--temperature", type=RATE, default=1.0, help="GSM8K pass@k: sampling temperature")
    p.add_argument("--seed", type=number(int), default=0, help="seed of the stratified MMLU subset and of the samples")
    p.add_argument("--batch-size", type=SIZE, default=64, help="prompts per generation / contexts per scoring batch")
    p.add_argument("--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32",
                   choices=["float32", "bfloat16", "float16", "float64"], help="the base model's weights")
    args = p.parse_args(argv)
    args.device = distributed.init(args.device)    # under torchrun: each rank scores its share of every task
    args.data_dir = resolve_data_dir(args.model, args.data_dir)
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if set(tasks) - set(TASKS):
        p.error(f"unknown task(s) {', '.join(sorted(set(tasks) - set(TASKS)))}; choose from {', '.join(TASKS)}")
    limits = {t: next(v for v in (getattr(args, f"limit_{t}"), args.limit, DEFAULT_LIMITS[t]) if v is not None)
              for t in TASKS}
    name = os.path.splitext(os.path.basename(args.checkpoint))[0] if args.checkpoint else \
        os.path.basename(os.path.normpath(args.model))
    out_path = output_dir(args.out or os.path.join("results", f"{name}.json"))
    pred_path = os.path.splitext(out_path)[0] + ".jsonl"
    baseline = _need(_json(_read(args.baseline), args.baseline), ("tasks",), args.baseline) if args.baseline else None

    # Data before the model: a missing file fails at once, not after minutes of loading weights.
    data = {}
    if "gsm8k" in tasks:
        data["gsm8k"] = load_gsm8k("test", args.data_dir)[:limits["gsm8k"] or None]
        shots = load_gsm8k("train", args.data_dir)[:args.fewshot] if args.fewshot else []
    if "truthfulqa" in tasks:
        data["truthfulqa"] = load_truthfulqa(args.data_dir)[:limits["truthfulqa"] or None]
    if "mmlu" in tasks:
        data["mmlu"] = stratified_subset(load_mmlu("test", args.data_dir), limits["mmlu"], args.seed)
        dev = load_mmlu("dev", args.data_dir) if args.fewshot else []

    model, tok = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    checkpoint = None
    if args.checkpoint:
        ckpt = lora.load_adapter(model, args.checkpoint)
        checkpoint = {"path": args.checkpoint, "sha256": file_sha256(args.checkpoint), "lora": ckpt["lora"],
                      "meta": {k: v for k, v in ckpt["meta"].items() if k != "base_config"}}
    result = {"model": args.model, "checkpoint": checkpoint, "device": args.device, "dtype": args.dtype,
              "data": args.data_dir or "huggingface hub", "tasks": {}, "predictions": pred_path}
    records = []

    with lora.merged(model):   # a no-op without a checkpoint
        for task in tasks:
            t0 = time.time()
            n = limits[task]
            mine, progress = distributed.share(data[task]), distributed.main_rank()
            if task == "gsm8k":
                recs = eval_gsm8k(model, tok, mine, shots, args.max_new_tokens, args.batch_size, progress,
                                  args.samples, args.temperature, distributed.seed(args.seed))[1]
                protocol = {"lm_eval_task": "gsm8k", "prompt": "Question: {question}\nAnswer:",
                            "fewshot": args.fewshot, "fewshot_from": "train, first k",
                            "subset": f"test, first {n}" if n else "test, all",
                            "decoding": "greedy", "max_new_tokens": args.max_new_tokens, "stop": list(GSM8K_STOP),
                            "extraction": "score: strict-match, else flexible-extract (last number), numeric "
                                          "comparison; lm-eval's two filters beside it as exact_match,strict-match "
                                          "and exact_match,flexible-extract"}
                if args.samples:
                    protocol["pass_at_k"] = {"samples": args.samples, "temperature": args.temperature,
                                             "seed": args.seed,
                                             "estimator": "1 - C(n-c, k) / C(n, k) (Chen et al. 2021)"}
            elif task == "truthfulqa":
                recs = eval_truthfulqa(model, tok, mine, args.batch_size, progress)[1]
                protocol = {"lm_eval_task": "truthfulqa_mc1, truthfulqa_mc2", "prompt": "6-shot QA preamble + "
                            "\n\nQ: {question}\nA:", "continuation": "' ' + choice", "fewshot": 0,
                            "subset": f"validation, first {n}" if n else "validation, all", "score": "mc1"}
            else:
                recs = eval_mmlu(model, tok, mine, dev, args.fewshot, args.batch_size, progress)[1]
                protocol = {"lm_eval_task": "mmlu", "prompt": "subject header + question + A-D lines + Answer:",
                            "continuation": "' A' .. ' D'", "fewshot": args.fewshot,
                            "fewshot_from": "dev, first k",
                            "subset": f"test, {n} stratified by subject (proportional), seed {args.seed}" if n
                            else "test, all", "subjects": len({ex["subject"] for ex in data[task]})}
            # every rank's records in item order (GSM8K and TruthfulQA ids are positions), then the task's summary
            recs = distributed.gather(recs)
            for i, r in enumerate(recs):
                r["id"] = r["id"] if task == "mmlu" else i
            result["tasks"][task] = {**summary(recs), "protocol": {"limit": n, **protocol},
                                     "seconds": round(time.time() - t0, 2)}
            records += recs

    if baseline is not None:
        base = {t: v["score"] for t, v in baseline["tasks"].items()}
        post = {t: v["score"] for t, v in result["tasks"].items()}
        result["forgetting"] = {"baseline": args.baseline, **forgetting(base, post)}
        differ = [t for t in RETENTION_TASKS if t in result["forgetting"] and
                  baseline["tasks"][t].get("protocol") != result["tasks"][t]["protocol"]]
        if differ:
            result["forgetting"]["warning"] = f"protocol differs from the baseline's for {', '.join(differ)}"
            print(f"warning: {result['forgetting']['warning']}: the comparison is not like for like")

    # Each file whole or not at all, the predictions first: reproduce.py takes an existing result JSON as done.
    if distributed.main_rank():
        write_text(pred_path, "".join(json.dumps(r) + "\n" for r in records))
        write_text(out_path, json.dumps(result, indent=2, default=str))
        parts = [f"{t} {v['score']:.3f}" + (f" (mc2 {v['mc2']:.3f})" if "mc2" in v else "") +
                 "".join(f" pass@{k} {p['score']:.3f}" for k, p in v.get("pass_at_k", {}).items()) + f" n={v['n']}"
                 for t, v in result["tasks"].items()]
        if "forgetting" in result:
            m = result["forgetting"]["mean"]
            parts.append(f"mean forgetting {m['forgetting']:+.3f}" +
                         (f", retention {m['retention']:.3f}" if m["retention"] is not None else ""))
        print(f"{name}: " + " | ".join(parts) + f" -> {out_path}")
    distributed.barrier()   # the files are on disk before any rank goes on (reproduce.py's next stage reads them)
    return result


if __name__ == "__main__":
    run(main)
