"""The tiny world (tiny/world.py): a deterministic generator; correct solutions that recall the people's numeric facts;
train problems and validation/test problems about disjoint people whose numbers only the corpus states; valid
retention layouts; and a pretraining run whose output loads in model.py and in transformers with the same logits."""
import csv
import filecmp
import json
import os
import re

import pytest
import torch

from model import load_model
from tiny import pretrain
from tiny import world as tinyworld

SMALL = ["--train", "84", "--validation", "42", "--test", "42", "--docs", "1500", "--people", "160", "--stretch",
         "0.2", "--truthfulqa", "60", "--truthfulqa-validation", "30", "--extra", "12", "--vocab", "320"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tinyworld"))
    tinyworld.main(["--out", out, "--seed", "3"] + SMALL)
    return out


def rows(world_dir, split):
    with open(os.path.join(world_dir, "gsm8k", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_solutions_recall_the_people_s_facts_and_compute_correctly(world_dir):
    with open(os.path.join(world_dir, "world.json")) as f:
        world = json.load(f)
    people = {p["name"]: p for p in world["person"]}
    train_people = set(world["train_people"])
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for split, n in [("train", 84), ("validation", 42), ("test", 42)]:
        rs = rows(world_dir, split)
        assert len(rs) == n
        for r in rs:
            *lines, last = r["answer"].split("\n")
            named = {p for p in people if p in r["question"]}
            assert named and all((p in train_people) == (split == "train") for p in named)
            recalled = [line for line in lines if "<<" not in line]
            assert recalled and not any(line in r["question"] for line in recalled)   # the question states no fact
            for line in recalled:
                name, value = re.fullmatch(r"(.+?) (?:is |earns \$|keeps )(\d+)(?: years old| an hour| hens)\.", line).groups()
                attr = "age" if "years old" in line else "wage" if "an hour" in line else "hens"
                assert people[name][attr] == int(value)
            results = []
            for line in lines[len(recalled):]:
                a, op, b, c = re.search(r"(\d+) ([-+*]) (\d+) = \$?<<\1 \2 \3 = (\d+)>>\4", line).groups()
                assert ops[op](int(a), int(b)) == int(c) >= 0
                results.append(int(c))
            assert last == f"#### {results[-1]}"


def test_splits_are_disjoint_and_the_corpus_asks_none_of_them(world_dir):
    qs = {s: {r["question"] for r in rows(world_dir, s)} for s in ("train", "validation", "test")}
    assert not qs["train"] & qs["validation"] and not qs["train"] & qs["test"] and not qs["validation"] & qs["test"]
    with open(os.path.join(world_dir, "corpus.jsonl")) as f:
        corpus = [json.loads(line)["text"] for line in f]
    asked = {t.split("\nAnswer:")[0].removeprefix("Question: ") for t in corpus if t.startswith("Question: ")}
    assert asked and not asked & (qs["train"] | qs["validation"] | qs["test"])
    assert any(t.startswith("Calculator tape:\n<<") for t in corpus)


def test_truthfulqa_items_list_their_one_true_mc1_choice_first_and_it_states_the_world_fact(world_dir):
    with open(os.path.join(world_dir, "truthfulqa", "mc_task.json")) as f:
        items = json.load(f)
    with open(os.path.join(world_dir, "world.json")) as f:
        people = {p["name"]: p for p in json.load(f)["person"]}
    assert len(items) == 60
    for it in items:
        assert list(it["mc1_targets"].values()).count(1) == 1 and len(it["mc1_targets"]) == 4
        assert sum(it["mc2_targets"].values()) == 2 and len(it["mc2_targets"]) == 8
        # the real file's layout: the true choices first (lm-eval's truthfulqa_mc1 scores index 0)
        assert list(it["mc1_targets"].values()) == [1, 0, 0, 0]
        assert list(it["mc2_targets"].values()) == [1, 1] + [0] * 6
        true = next(c for c, v in it["mc1_targets"].items() if v)
        name = next(n for n in people if it["question"].find(n) >= 0)
        value = people[name][{"Where": "home", "What does": "job", "What pet": "pet"}[
            next(k for k in ["Where", "What does", "What pet"] if it["question"].startswith(k))]]
        assert true.startswith(name) and true.endswith(f" {value}.")


def test_mmlu_rows_have_six_fields_and_the_letter_names_the_world_fact(world_dir):
    with open(os.path.join(world_dir, "world.json")) as f:
        world = json.load(f)
    values = {e["name"]: set(v for k, v in e.items() if k != "name")
              for kind, entities in world.items() if kind != "train_people" for e in entities}
    subjects = sorted(f.removesuffix("_test.csv") for f in os.listdir(os.path.join(world_dir, "mmlu", "test")))
    assert subjects == ["botany", "geography", "history", "zoology"]
    for subject in subjects:
        for split, n in [("test", None), ("dev", 5)]:
            with open(os.path.join(world_dir, "mmlu", split, f"{subject}_{split}.csv"), newline="") as f:
                rows = list(csv.reader(f))
            assert n is None or len(rows) == n
            for row in rows:
                assert len(row) == 6 and row[5] in "ABCD" and len(set(row[1:5])) == 4
                entity = next(e for e in values if re.search(rf"\b{re.escape(e)}\b", row[0]))
                assert row[1 + "ABCD".index(row[5])] in values[entity]


def test_truthfulqa_facts_are_stated_but_never_asked_while_mmlu_items_are_asked_with_their_answer(world_dir):
    with open(os.path.join(world_dir, "corpus.jsonl")) as f:
        corpus = "\n".join(json.loads(line)["text"] for line in f)
    with open(os.path.join(world_dir, "truthfulqa", "mc_task.json")) as f:
        items = json.load(f)
    assert "Q: " in corpus and not any(f"Q: {it['question']}" in corpus for it in items)
    people = {" ".join(it["question"].split()[2:4]).rstrip("?") for it in items if it["question"].startswith("Where")}
    assert sum(p in corpus for p in people) > 0.5 * len(people)  # stated (this small corpus misses some)
    rows = []
    for name in os.listdir(os.path.join(world_dir, "mmlu", "test")):
        with open(os.path.join(world_dir, "mmlu", "test", name), newline="") as f:
            rows += list(csv.reader(f))
    asked = [f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}" for q, a, b, c, d, ans in rows]
    assert sum(item in corpus for item in asked) > 0.5 * len(asked)


def test_twenty_step_pretraining_writes_a_model_that_transformers_loads_with_equal_logits(world_dir, tmp_path):
    out = str(tmp_path / "model")
    pretrain.main(["--data-dir", world_dir, "--out", out, "--steps", "20", "--warmup", "5", "--hidden", "64",
                   "--layers", "2", "--heads", "4", "--kv-heads", "2", "--head-dim", "16", "--intermediate", "128",
                   "--seq-len", "64", "--batch-size", "4", "--eval-n", "0"])
    ours, tok = load_model(out)
    assert tok.eos_ids == [0] and tok.pad_id == 0 and tok.decode(tok.encode("Answer: 12 + 7")) == "Answer: 12 + 7"
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "qwen3" and config["rope_theta"] == 10000.0 and config["tie_word_embeddings"]
    from transformers import Qwen3ForCausalLM
    theirs = Qwen3ForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([tok.encode("Question: Tom has 3 apples and buys 4 more.\nAnswer: 3 + 4 = 7\n#### 7")])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=1e-5, rtol=1e-5)
    # trained, not random: the loss fell
    with open(os.path.join(out, "pretrain.json")) as f:
        log = json.load(f)["log"]
    assert log[-1]["loss"] < log[0]["loss"] - 0.5


def test_same_seed_writes_the_same_bytes_and_another_seed_does_not(world_dir, tmp_path):
    tinyworld.main(["--out", str(tmp_path / "again"), "--seed", "3"] + SMALL)
    tinyworld.main(["--out", str(tmp_path / "other"), "--seed", "4"] + SMALL)
    files = all_files(world_dir)
    assert files == all_files(tmp_path / "again")
    assert {"truthfulqa/validation.json", "mmlu/validation/botany_validation.csv", "gsm8k/kinds.json"} <= set(files)
    assert all(filecmp.cmp(os.path.join(world_dir, f), tmp_path / "again" / f, shallow=False) for f in files)
    assert not filecmp.cmp(os.path.join(world_dir, "corpus.jsonl"), tmp_path / "other" / "corpus.jsonl", shallow=False)


def test_splits_are_disjoint_draw_every_kind_and_the_corpus_draws_the_rare_kinds_rarely(world_dir):
    questions = {split: [r["question"] for r in rows(world_dir, split)] for split in ("train", "validation", "test")}
    assert [len(q) for q in questions.values()] == [84, 42, 42]
    assert sum(len(set(q)) for q in questions.values()) == len(set().union(*questions.values())) == 168
    with open(os.path.join(world_dir, "gsm8k", "kinds.json")) as f:
        kinds = json.load(f)
    rare = tinyworld.N_KINDS
    assert all(any(k >= rare for k in kinds[split]) for split in kinds)   # every split draws the rare kinds ...
    assert sum(k >= rare for k in kinds["train"]) / 84 > 0.1              # ... about 10 in 27 of its problems (--split-rare-weight 2.5)
    with open(os.path.join(world_dir, "corpus.jsonl")) as f:
        corpus = [json.loads(line)["text"] for line in f]
    problems = [t for t in corpus if t.startswith("Question: ")]
    pay_cut = [t for t in problems if "pay cut" in t or "goes down by" in t]
    raise_ = [t for t in problems if "gets a raise" in t or "goes up by" in t]
    assert len(pay_cut) * 5 < len(raise_)   # kind 17 (weight 0.03) against its common relative, kind 12
    assert not set(problems) & {f"Question: {q}" for qs in questions.values() for q in qs}


def test_rare_kinds_compute_the_twisted_plan(world_dir):
    with open(os.path.join(world_dir, "world.json")) as f:
        people = {p["name"]: p for p in json.load(f)["person"]}
    with open(os.path.join(world_dir, "gsm8k", "kinds.json")) as f:
        kinds = json.load(f)["train"]
    seen = set()
    for r, kind in zip(rows(world_dir, "train"), kinds):
        named = [p for p in people if p in r["question"]]
        result = int(r["answer"].split("#### ")[1])
        if kind == rare_kind(0):       # pay cut: (wage - c) * h
            c, h = map(int, re.findall(r"\$?(\d+)", r["question"]))
            assert result == h * (people[named[0]]["wage"] - c)
        elif kind == rare_kind(2):     # hens given: the receiver's hens + c
            c = int(re.search(r"(\d+)", r["question"])[1])
            receiver = re.search(r"hens does (.+?) (have|keep) now", r["question"])[1]
            assert result == people[receiver]["hens"] + c
        elif kind == rare_kind(3):     # the age gap does not depend on the years
            assert result == abs(people[named[0]]["age"] - people[named[1]]["age"])
        seen.add(kind)
    assert {rare_kind(0), rare_kind(2), rare_kind(3)} <= seen


def rare_kind(i):
    return tinyworld.N_KINDS + i


def test_validation_retention_items_are_apart_from_the_evaluated_and_the_extra_ones(world_dir):
    def questions(name):
        with open(os.path.join(world_dir, "truthfulqa", f"{name}.json")) as f:
            return [item["question"] for item in json.load(f)]
    tq = {name: questions(name) for name in ("mc_task", "validation", "extra")}
    assert [len(q) for q in tq.values()] == [60, 30, 12]
    assert len(set().union(*map(set, tq.values()))) == 102

    def stems(split):
        out = []
        for path in sorted(os.listdir(os.path.join(world_dir, "mmlu", split))):
            with open(os.path.join(world_dir, "mmlu", split, path), newline="") as f:
                out += [row[0] for row in csv.reader(f)]
        return out
    mm = {split: stems(split) for split in ("test", "validation", "extra", "dev")}
    assert all(mm.values()) and len(set().union(*map(set, mm.values()))) == sum(map(len, mm.values()))
    with open(os.path.join(world_dir, "corpus.jsonl")) as f:
        corpus = f.read()
    asked = [s for s in mm["test"] + mm["validation"] if json.dumps(s)[1:-1] + "\\nA." in corpus]
    assert len(asked) > 0.5 * len(mm["test"] + mm["validation"])   # the corpus asks validation items as it asks test ones
