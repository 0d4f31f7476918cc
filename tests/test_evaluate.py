"""evaluate.py: lm-eval's GSM8K answer extraction, exact log-likelihoods, the task prompts, Eq. 12, the CLI.

tests/data/eval_data is a miniature of ../shared/data: the full GSM8K test split (1319 answers), its first
3 train rows, 5 TruthfulQA v0 questions (0-3 and 25, whose true MC2 answers are not all first) and the
first 4 test / 2 dev rows of three MMLU subjects.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import evaluate as E
from model import LoadError, load_model

HERE = os.path.dirname(__file__)
DATA = os.path.join(HERE, "data", "eval_data")
ROOT = os.path.dirname(HERE)


@pytest.fixture(scope="module")
def model_and_tok(tiny_dir):
    return load_model(tiny_dir)


# ----------------------------------------------------------------------------------------------
# GSM8K extraction (the GRPO reward too)


def test_extraction_recovers_the_gold_of_every_gsm8k_test_answer():
    rows = E.load_gsm8k("test", DATA)
    assert len(rows) == 1319
    for r in rows:
        gold = r["answer"].split("#### ")[-1].replace(",", "")   # e.g. "#### 2,125" -> "2125"
        assert E.extract_answer(r["answer"]) == gold
        assert E.is_correct(r["answer"], r["answer"])


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),             # the training format: strict-match
    ("#### 1,000", "1000"),                                           # thousands separator
    ("#### 18\nThen 5 more questions about 3 ducks.", "18"),          # strict-match wins over later numbers
    ("She makes 9 * 2 = $18 every day.", "18"),                       # no ####: the last number, $ dropped
    ("The total is $1,234.56.", "1234.56"),                           # $, comma, sentence-final period
    ("It takes 3 + 2 = 5 hours to finish", "5"),                      # units after the number
    ("So the answer is 72.", "72"),
    ("The temperature drops to -4 degrees", "-4"),                    # negative
    ("He has 5 apples, so 5 / 2 = 2.5 each", "2.5"),                  # several numbers: the last
    ("I don't know.", None),                                          # no number at all
])
def test_extraction_handles_usual_model_outputs(text, expected):
    assert E.extract_answer(text) == expected


def test_is_correct_compares_numbers_not_strings():
    assert E.is_correct("so she has 18.00 dollars", "Janet ... \n#### 18")
    assert E.is_correct("The answer is 1,080", "#### 1080")
    assert not E.is_correct("The answer is 17", "#### 18")
    assert not E.is_correct("no idea", "#### 18")
    # lm-eval's flexible-extract also matches digit-free runs such as "..."; they never count as correct
    assert E.extract_answer("Let me think...") == ".." and not E.is_correct("Let me think...", "#### 18")


def test_gsm8k_prompt_is_lm_eval_format_with_first_k_train_exemplars():
    shots = E.load_gsm8k("train", DATA)[:2]
    assert E.gsm8k_prompt("What is 2+3?") == "Question: What is 2+3?\nAnswer:"
    prompt = E.gsm8k_prompt("What is 2+3?", shots)
    assert prompt.startswith(f"Question: {shots[0]['question']}\nAnswer: {shots[0]['answer']}\n\nQuestion: ")
    assert prompt.endswith(f"{shots[1]['answer']}\n\nQuestion: What is 2+3?\nAnswer:")


# ----------------------------------------------------------------------------------------------
# Log-likelihoods


def hf_loglikelihood(hf, tok, context, continuation):
    """The reference: transformers on tok(context) + the continuation's own tokens, summed log-probs."""
    ctx = tok.encode(context)
    cont = tok.encode(context + continuation)[len(ctx):]
    with torch.no_grad():
        logp = hf(torch.tensor([ctx + cont])).logits[0].double().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(cont))


def test_loglikelihoods_equal_transformers_in_a_padded_batch(tiny_dir, model_and_tok):
    from transformers import Qwen3ForCausalLM
    hf = Qwen3ForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    model, tok = model_and_tok
    requests = [  # contexts of different lengths, choices of different lengths: padding on both sides
        ("Q: How many apples does Tom have?\nA:", [" 7", " Tom has seven apples.", " None"]),
        ("Question: 3 + 4?\nAnswer:", [" A", " B", " C", " D"]),
        ("The following are multiple choice questions (with answers) about arithmetic.\n\nWhat is 3 + 4?\n"
         "A. 6\nB. 7\nC. 8\nD. 9\nAnswer:", [" B", " 7 apples and 3 more", " 12"]),
    ]
    got = E.loglikelihoods(model, tok, requests, batch_size=2)     # two batches, contexts sorted by length
    for (context, choices), lls in zip(requests, got):
        want = [hf_loglikelihood(hf, tok, context, c) for c in choices]
        torch.testing.assert_close(torch.tensor(lls, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=1e-5, rtol=1e-5)


def test_shared_context_scoring_equals_scoring_each_choice_alone(model_and_tok):
    model, tok = model_and_tok
    context = E.truthfulqa_prompt("How many apples does Tom have?")
    choices = [" Tom has 7 apples.", " 3", " He has no apples at all, because he sold them."]
    shared = E.loglikelihoods(model, tok, [(context, choices)])[0]
    alone = [E.loglikelihoods(model, tok, [(context, [c])])[0][0] for c in choices]
    torch.testing.assert_close(torch.tensor(shared), torch.tensor(alone), atol=1e-5, rtol=1e-5)


def test_trailing_context_space_is_scored_with_the_continuation(model_and_tok):
    # lm-eval's _encode_pair: "A: " + "yes" is scored as "A:" + " yes" (the way the text is really tokenized)
    model, tok = model_and_tok
    a = E.loglikelihoods(model, tok, [("Question: 3 + 4?\nAnswer: ", ["7", "8"])])
    b = E.loglikelihoods(model, tok, [("Question: 3 + 4?\nAnswer:", [" 7", " 8"])])
    assert a == b


def test_mc2_is_the_normalized_probability_mass_on_true_answers():
    lls = torch.tensor([0.5, 0.3, 0.2]).log().tolist()
    assert E.mc2_score(lls, [1, 0, 1]) == pytest.approx(0.7)
    assert E.mc2_score([-1000.0, -1000.0 - torch.log(torch.tensor(3.0)).item()], [0, 1]) == pytest.approx(0.25)


# ----------------------------------------------------------------------------------------------
# Prompts, data and subsets


def test_truthfulqa_prompt_is_the_six_shot_preamble_then_the_question():
    p = E.truthfulqa_prompt("Is the sky green?")
    assert p.startswith("Q: What is human life expectancy in the United States?\nA: Human life expectancy")
    assert p.endswith("A: The 1992 Olympics were held in Barcelona, Spain.\n\nQ: Is the sky green?\nA:")
    assert p.count("\nA: ") == 6


def test_mmlu_prompt_matches_lm_eval_with_and_without_exemplars():
    ex = {"subject": "high_school_geography", "question": " Where? ", "choices": ["a", "b", "c", "d"], "answer": 2}
    body = "Where?\nA. a\nB. b\nC. c\nD. d\nAnswer:"
    header = "The following are multiple choice questions (with answers) about high school geography.\n\n"
    assert E.mmlu_prompt(ex) == header + body
    assert E.mmlu_prompt(ex, [ex, ex]) == header + f"{body} C\n\n{body} C\n\n" + body


def test_local_loaders_read_the_standard_layout():
    tqa = E.load_truthfulqa(DATA)
    assert len(tqa) == 5 and all(sum(ex["mc1"]["labels"]) == 1 for ex in tqa)
    assert tqa[4]["mc2"]["labels"] == [1, 1, 1, 0, 1, 0, 0, 0, 0]   # v0 question 25: order kept
    mmlu = E.load_mmlu("test", DATA)
    assert len(mmlu) == 12 and mmlu[0]["id"] == "abstract_algebra/0" and mmlu[0]["answer"] == 1   # letter B
    assert len(E.load_mmlu("dev", DATA)) == 6


def test_missing_data_is_a_one_line_error_naming_the_file(tmp_path):
    with pytest.raises(LoadError, match="gsm8k/test.jsonl does not exist"):
        E.load_gsm8k("test", str(tmp_path))
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(LoadError, match="line 1 has no field 'answer'"):
        E.load_gsm8k("test", str(tmp_path))
    with pytest.raises(LoadError, match="mmlu"):
        E.load_mmlu("test", str(tmp_path))


def test_the_hub_download_writes_the_local_layout(tmp_path, monkeypatch):
    """No network here: the hub's rows are made from the local sample, in the hub's schema, and the download must
    write files the loaders read back as the same examples (and only once)."""
    import datasets
    tqa = E.load_truthfulqa(DATA)
    hub = {"openai/gsm8k": {split: E.load_gsm8k(split, DATA) for split in ("train", "test")},
           "truthfulqa/truthful_qa": {"validation": [{"question": ex["question"], "mc1_targets": ex["mc1"],
                                                      "mc2_targets": ex["mc2"]} for ex in tqa]},
           "cais/mmlu": {split: [{"question": ex["question"], "subject": ex["subject"], "choices": ex["choices"],
                                  "answer": ex["answer"]} for ex in E.load_mmlu(split, DATA)]
                         for split in ("dev", "test")}}
    calls = []
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name, split: calls.append(path) or
                        datasets.Dataset.from_list(hub[path][split]))
    monkeypatch.setattr(E, "HUB_DATA", str(tmp_path / "hub"))
    for split in ("train", "test"):
        assert E.load_gsm8k(split) == E.load_gsm8k(split, DATA)
    assert E.load_truthfulqa() == tqa
    assert E.load_mmlu("test") == E.load_mmlu("test", DATA) and E.load_mmlu("dev") == E.load_mmlu("dev", DATA)
    assert calls == ["openai/gsm8k", "openai/gsm8k", "truthfulqa/truthful_qa", "cais/mmlu", "cais/mmlu"]
    assert sorted(os.listdir(tmp_path / "hub")) == ["gsm8k", "mmlu", "truthfulqa"]   # no temporary folder left


def test_a_failed_hub_download_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    monkeypatch.setattr(E, "HUB_DATA", str(tmp_path / "hub"))
    with pytest.raises(LoadError, match="could not download gsm8k from the Hugging Face hub .* pass --data-dir"):
        E.load_gsm8k("test")
    assert os.listdir(tmp_path / "hub") == []


def test_mmlu_subset_is_stratified_in_proportion_and_seeded():
    rows = [{"subject": s, "i": i} for s, n in (("a", 100), ("b", 290), ("c", 610)) for i in range(n)]
    sub = E.stratified_subset(rows, 10, seed=0)
    assert [sum(r["subject"] == s for r in sub) for s in "abc"] == [1, 3, 6]
    assert sub == E.stratified_subset(rows, 10, seed=0) != E.stratified_subset(rows, 10, seed=1)
    assert E.stratified_subset(rows, 0, seed=0) is rows


# ----------------------------------------------------------------------------------------------
# Eq. 12 and the command line


def test_forgetting_and_retention_on_known_numbers():
    out = E.forgetting(base={"gsm8k": 0.448, "truthfulqa": 0.30, "mmlu": 0.50},
                       post={"gsm8k": 0.60, "truthfulqa": 0.27, "mmlu": 0.45})
    assert set(out) == {"truthfulqa", "mmlu", "mean"}                  # GSM8K is the target, not retention
    assert out["truthfulqa"]["forgetting"] == pytest.approx(0.03)
    assert out["mmlu"]["retention"] == pytest.approx(0.9)
    assert out["mean"]["forgetting"] == pytest.approx(0.04)
    assert out["mean"]["retention"] == pytest.approx(0.9)


def run_cli(*args):
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_cli_writes_json_and_jsonl_then_compares_a_checkpoint_with_the_baseline(tiny_dir, tmp_path):
    base = tmp_path / "base.json"
    stdout = run_cli("--model", tiny_dir, "--data-dir", DATA, "--limit", "3", "--max-new-tokens", "8",
                     "--out", str(base))
    result = json.loads(base.read_text())
    assert set(result["tasks"]) == {"gsm8k", "truthfulqa", "mmlu"} and result["checkpoint"] is None
    for task in result["tasks"].values():
        assert task["n"] == 3 and 0 <= task["score"] <= 1 and task["protocol"]["limit"] == 3
    preds = [json.loads(line) for line in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert [p["task"] for p in preds] == ["gsm8k"] * 3 + ["truthfulqa"] * 3 + ["mmlu"] * 3
    assert all({"id", "prediction", "gold", "correct"} <= set(p) for p in preds)
    assert sum(p["correct"] for p in preds if p["task"] == "mmlu") / 3 == result["tasks"]["mmlu"]["score"]
    assert str(base) in stdout.strip().splitlines()[-1]                # the one-line summary

    import lora
    model, _ = load_model(tiny_dir)
    lora.add_lora(model, lora.LoraConfig(r=4, alpha=8), name="eval_test")
    with torch.no_grad():
        for p in lora.lora_parameters(model, "eval_test"):
            p.normal_(0, 0.2)                                         # a non-trivial adapter
    ckpt = tmp_path / "adapter.pt"
    lora.save_checkpoint(str(ckpt), model, {"method": "test"}, name="eval_test")
    post = tmp_path / "post.json"
    run_cli("--model", tiny_dir, "--checkpoint", str(ckpt), "--data-dir", DATA, "--tasks", "truthfulqa,mmlu",
            "--limit", "3", "--baseline", str(base), "--out", str(post))
    result = json.loads(post.read_text())
    assert result["checkpoint"]["meta"]["method"] == "test" and len(result["checkpoint"]["sha256"]) == 64
    f = result["forgetting"]
    for t in ("truthfulqa", "mmlu"):
        assert f[t]["base"] == json.loads(base.read_text())["tasks"][t]["score"]
        assert f[t]["forgetting"] == pytest.approx(f[t]["base"] - result["tasks"][t]["score"])
    assert "warning" not in f                                          # same protocol on both sides


# ----------------------------------------------------------------------------------------------
# Standard errors (the study's bootstrap intervals: tests/test_study.py)

import numpy as np


def test_stderr_is_the_sample_std_over_root_n_and_every_task_reports_it():
    assert E.stderr([1, 0, 1, 1]) == pytest.approx(np.std([1, 0, 1, 1], ddof=1) / 2)
    records = [{"task": "truthfulqa", "correct": c, "mc2": m} for c, m in ((True, 0.9), (False, 0.2), (True, 0.7))]
    s = E.summary(records)
    assert s["score"] == s["mc1"] == pytest.approx(2 / 3) and s["mc2"] == pytest.approx(0.6)
    assert s["stderr"] == pytest.approx(E.stderr([1, 0, 1])) and s["mc2_stderr"] == pytest.approx(E.stderr([0.9, 0.2, 0.7]))


# ----------------------------------------------------------------------------------------------
# pass@k


def test_pass_at_k_is_the_closed_form_and_the_share_of_k_subsets_with_a_correct_sample():
    import itertools
    assert E.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert E.pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)        # 1 - C(3,2)/C(5,2)
    assert E.pass_at_k(5, 2, 4) == 1.0 and E.pass_at_k(5, 0, 4) == 0.0
    for n, reported in ((8, ["1", "2", "4", "8"]), (6, ["1", "2", "4"]), (0, [])):   # k = 1, 2, 4, .. up to n
        s = E.summary([{"task": "gsm8k", "correct": True, "samples": n, "samples_correct": 1}])
        assert list(s.get("pass_at_k", {})) == reported
    for n in range(1, 9):
        for c in range(n + 1):
            draws = [1] * c + [0] * (n - c)
            values = []
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(draws, k))
                assert E.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets))
                values.append(E.pass_at_k(n, c, k))
            assert values == sorted(values)                              # monotone in k


def test_samples_add_pass_at_k_per_item_and_per_task(tiny_dir, tmp_path):
    out = tmp_path / "passk.json"
    run_cli("--model", tiny_dir, "--data-dir", DATA, "--tasks", "gsm8k", "--limit", "3", "--max-new-tokens", "8",
            "--samples", "4", "--temperature", "1.5", "--out", str(out))
    result = json.loads(out.read_text())["tasks"]["gsm8k"]
    assert set(result["pass_at_k"]) == {"1", "2", "4"} and result["protocol"]["pass_at_k"]["samples"] == 4
    records = [json.loads(line) for line in (tmp_path / "passk.jsonl").read_text().splitlines()]
    assert all(r["samples"] == 4 and 0 <= r["samples_correct"] <= 4 for r in records)
    # hand-made records: the per-task figure is the mean of the per-item estimates
    records = [dict(r, samples=4, samples_correct=c) for r, c in zip(records, (0, 1, 4))]
    s = E.summary(records)
    assert s["pass_at_k"]["1"]["score"] == pytest.approx((0 + 0.25 + 1) / 3)
    assert s["pass_at_k"]["2"]["score"] == pytest.approx((0 + 0.5 + 1) / 3)
    assert s["pass_at_k"]["4"]["score"] == pytest.approx(2 / 3)
    assert list(E.item_scores(records)["gsm8k_pass@2"]) == pytest.approx([0, 0.5, 1])


def test_gsm8k_reports_lm_evals_two_filters_beside_the_studys_score():
    """Issue 28: lm-eval's exact_match,strict-match and exact_match,flexible-extract (string match after its
    regexes_to_ignore) beside the study's score (strict, else flexible, compared as numbers)."""
    cases = [("3 + 4 = 7\n#### 7", True, True, True),        # both filters find 7
             ("so the answer is 7.", False, True, True),     # no "#### ": strict-match is [invalid]
             ("#### 7.00", False, False, True),              # "7.00" != "7" as strings, equal as numbers
             ("#### 8\nor 7", False, True, False),           # the study takes the strict answer, 8
             ("no number", False, False, False)]
    records = []
    for i, (text, strict, flexible, correct) in enumerate(cases):
        got = E.lm_eval_filters(text, "4 + 3 = 7\n#### 7")
        assert got == {"exact_match,strict-match": strict, "exact_match,flexible-extract": flexible}, text
        assert E.is_correct(text, "#### 7") == correct, text
        records.append({"task": "gsm8k", "id": i, "correct": correct, **got})
    result = E.summary(records)
    assert result["score"] == 0.6 and result["exact_match,strict-match"] == 0.2
    assert result["exact_match,flexible-extract"] == 0.6 and result["exact_match_stderr,strict-match"] > 0
