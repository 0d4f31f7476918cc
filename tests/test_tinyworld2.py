"""World 2 of the tiny study (tiny/world2.py): deterministic, correct solutions, and its construction: train
problems and validation/test problems about disjoint people whose numbers only the corpus states."""
import filecmp
import json
import os
import re

import pytest

from tiny import world2

SMALL = ["--train", "80", "--validation", "20", "--test", "30", "--docs", "800", "--world", "0.1", "--vocab", "320",
         "--extra", "12"]


@pytest.fixture(scope="module")
def world_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("tinyworld2"))
    world2.main(["--out", out, "--seed", "3"] + SMALL)
    return out


def rows(world_dir, split):
    with open(os.path.join(world_dir, "gsm8k", f"{split}.jsonl")) as f:
        return [json.loads(line) for line in f]


def all_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def test_same_seed_writes_the_same_bytes(world_dir, tmp_path):
    world2.main(["--out", str(tmp_path / "again"), "--seed", "3"] + SMALL)
    files = all_files(world_dir)
    assert files == all_files(tmp_path / "again") and "gsm8k/validation.jsonl" in files
    assert "truthfulqa/extra.json" in files and "mmlu/extra/botany_extra.csv" in files
    assert all(filecmp.cmp(os.path.join(world_dir, f), tmp_path / "again" / f, shallow=False) for f in files)


def test_solutions_recall_the_people_s_facts_and_compute_correctly(world_dir):
    with open(os.path.join(world_dir, "world.json")) as f:
        world = json.load(f)
    people = {p["name"]: p for p in world["person"]}
    train_people = set(world["train_people"])
    ops = {"+": int.__add__, "-": int.__sub__, "*": int.__mul__}
    for split, n in [("train", 80), ("validation", 20), ("test", 30)]:
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
