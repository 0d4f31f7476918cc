"""A candidate third world (issue 37): world 2 plus four problem kinds that the corpus shows rarely.

    python -m tiny.world3                      # writes tiny/probes/third/data/ (a couple of minutes)
    python -m tiny.world3 --out DIR --seed 1   # another world, same recipe

World 2 (tiny/world.py) makes nearly every wrong answer of its base a recalled fact of an evaluation person: the
train split can rehearse the plans, but the base already knows them, so fine-tuning has little to teach. This
world keeps world 2's people, facts, corpus and tokenizer, and adds what a train split can teach:

- four more problem kinds (17-20), each a near relative of a common kind with a twist that changes the plan (a pay
  cut beside world 2's raise; hours over two days; hens given to another person, the question about the receiver;
  the age gap "in c years", where c does not matter). The target splits draw all 21 kinds equally; the corpus's
  worked problems draw the four with small weights (--rare-weights, relative to 1 for a common kind), so the base
  has seen a few dozen to a few hundred of each and sometimes, not always, finds the plan. One pass over the train
  split (about 355 problems of each) rehearses them; the facts the evaluation people need stay pretraining's.
- validation splits of both retention tasks, made as the test items are and apart from them and from drift's
  extra contexts: truthfulqa/validation.json (held-out facts the corpus states, never asks) and
  mmlu/validation/<subject>_validation.csv (items the corpus asks, as it asks the test items). More retention
  items: twice world 2's towns, animals, plants and rulers, and more held-out person facts (--eval-frac 0.75).
- 1,000 validation target problems (world 2: 500).

Everything else is world 2's recipe (tiny/README.md). Everything is a function of --seed: the same bytes every time.
"""
import argparse
import csv
import json
import os
import random

from tqdm import tqdm

from tiny.world import (AGES, HENS, NAMES, SCHEMA, WAGES, N_KINDS, annotate, calculator_tape, fact, fact_text,
                        mmlu_row, mmlu_text, new_name, problem, qa_chain, train_tokenizer, truthfulqa_item,
                        world_facts)
from tiny.world import POOLS, invent

RARE_KINDS = 4   # kinds N_KINDS .. N_KINDS + 3


def rare_problem(rng: random.Random, people: list, kind: int, stated: bool):
    """Kinds 17-20, in world.problem's form: (question, answer, kind) or None when the people do not fit."""
    r = rng.randint
    x, y = rng.sample(people, 2)
    X, Y = x["name"], y["name"]
    if kind == N_KINDS:            # a pay cut: world 2's raise (kind 12) with the sign turned
        c, h = r(1, 3), r(2, 9)
        w = x["wage"] - c
        if w < 2:
            return None
        q = rng.choice([f"{X} takes a pay cut of ${c} an hour. How much does {X} earn for {h} hours now?",
                        f"The pay of {X} goes down by ${c} per hour. How many dollars does {X} now make in {h} hours?"])
        used = [(x, "wage")]
        steps = [f"{X} now earns {x['wage']} - {c} = ${w} an hour.", f"For {h} hours {X} earns {h} * {w} = ${h * w}."]
        res = h * w
    elif kind == N_KINDS + 1:      # two days of work: add the hours, then multiply once
        h1, h2 = r(2, 6), r(2, 6)
        n = h1 + h2
        q = rng.choice([f"{X} works {h1} hours on Monday and {h2} hours on Tuesday. How much money does {X} earn?",
                        f"Over two days {X} works {h1} hours and then {h2} hours. How many dollars does {X} make?"])
        used = [(x, "wage")]
        steps = [f"{X} works {h1} + {h2} = {n} hours.", f"{X} earns {n} * {x['wage']} = ${n * x['wage']}."]
        res = n * x["wage"]
    elif kind == N_KINDS + 2:      # hens given away: the question is about the receiver (world 2's kind 10 asks the buyer)
        c = r(1, x["hens"] - 1)
        q = rng.choice([f"{X} gives {c} hens to {Y}. How many hens does {Y} have now?",
                        f"{Y} gets {c} of the hens of {X}. How many hens does {Y} keep now?"])
        used = [(y, "hens")]
        steps, res = [f"{Y} now has {y['hens']} + {c} = {y['hens'] + c} hens."], y["hens"] + c
    else:                          # the age gap in c years: c does not matter (world 2's kind 4 adds it)
        if x["age"] == y["age"]:
            return None
        if x["age"] < y["age"]:
            x, y, X, Y = y, x, Y, X
        c = r(2, 30)
        q = rng.choice([f"How many years older than {Y} will {X} be in {c} years?",
                        f"In {c} years, by how many years will {X} be older than {Y}?"])
        used = [(x, "age"), (y, "age")]
        d = x["age"] - y["age"]
        steps, res = [f"{X} is {x['age']} - {y['age']} = {d} years older, now and in {c} years."], d
    recalls = list(dict.fromkeys(fact(p, a) for p, a in used))
    if stated:
        return " ".join(recalls) + " " + q, "\n".join(steps) + f"\n#### {res}", kind
    return q, "\n".join(recalls + steps) + f"\n#### {res}", kind


def problem3(rng: random.Random, people: list, weights: list, stated: bool = False):
    """A problem of one of the 21 kinds, drawn with `weights` (the splits: all equal; the corpus: rare kinds low)."""
    kind = rng.choices(range(N_KINDS + RARE_KINDS), weights)[0]
    if kind < N_KINDS:
        return problem(rng, people, stated, kind)
    return rare_problem(rng, people, kind, stated)


def build_world(rng: random.Random, counts: dict) -> dict:
    """world.build_world with each kind's count given (the retention entities stretched, the people as world 2's)."""
    taken = set()
    pools = dict(POOLS, region=[invent(rng, taken, (2, 3)).capitalize() for _ in range(4)],
                 river=[invent(rng, taken, (2, 2)).capitalize() for _ in range(4)],
                 capital=[invent(rng, taken, (2, 3)).capitalize() for _ in range(4)],
                 land=[invent(rng, taken, (2, 3), "ia").capitalize() for _ in range(4)],
                 age=AGES, wage=WAGES, hens=HENS)
    world = {"pools": pools}
    for kind in ["town", "person", "animal", "plant", "ruler"]:
        _, _, attrs = SCHEMA[kind]
        world[kind] = []
        for _ in range(counts[kind]):
            entity = {"name": new_name(kind, rng, taken)}
            for attr, (pool, _, _) in attrs.items():
                entity[attr] = rng.choice([t["name"] for t in world["town"]] if pool == "town" else pools[pool])
            world[kind].append(entity)
    return world


def mc_block(asked_by_subject: dict, rng: random.Random, rows: tuple) -> str:
    subject = rng.choice(list(asked_by_subject))
    return mmlu_text(subject, [mmlu_row(f) for f in rng.sample(asked_by_subject[subject], rng.randint(*rows))])


def main(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(here, "probes", "third", "data"), help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--train", type=int, default=7473, help="target-task train problems (GSM8K's count)")
    parser.add_argument("--validation", type=int, default=1000, help="target-task validation problems")
    parser.add_argument("--test", type=int, default=1319, help="target-task test problems (GSM8K's count)")
    parser.add_argument("--rare-weights", default="0.03,0.03,0.08,0.08",
                        help="corpus weights of kinds 17-20 relative to 1 for each of kinds 0-16 (the splits: all 1)")
    parser.add_argument("--split-rare-weight", type=float, default=1.0,
                        help="weight of each rare kind in the target splits, relative to 1 for a common kind")
    parser.add_argument("--people", type=int, default=1600, help="people (world 2's count)")
    parser.add_argument("--stretch", type=float, default=2.0,
                        help="towns, animals, plants and rulers: this many times world 2's counts (more MMLU items)")
    parser.add_argument("--train-people", type=float, default=0.6, help="share of people the train problems are about")
    parser.add_argument("--eval-frac", type=float, default=0.75, help="share of categorical facts held out for evaluation")
    parser.add_argument("--truthfulqa", type=int, default=2000, help="TruthfulQA test items")
    parser.add_argument("--truthfulqa-validation", type=int, default=1000, help="TruthfulQA validation items")
    parser.add_argument("--mmlu-validation", type=float, default=1 / 3, help="share of the held-out MMLU facts for validation")
    parser.add_argument("--extra", type=int, default=300, help="extra, never evaluated items per retention task")
    parser.add_argument("--docs", type=int, default=130_000, help="corpus documents")
    parser.add_argument("--mix", default="0.28,0.11,0.30,0.06,0.18,0.07",
                        help="corpus shares: entity problems, stated problems, facts, qa, mc, calculator tapes")
    parser.add_argument("--mc-rows", default="2,5", help="rows per MMLU-layout block of the corpus (min,max)")
    parser.add_argument("--categorical-p", type=float, default=0.7,
                        help="probability that a person's passage states each categorical fact")
    parser.add_argument("--numeric-p", type=float, default=0.45,
                        help="probability that a person's passage states each numeric fact")
    parser.add_argument("--annotated", type=float, default=0.05, help="share of corpus worked problems annotated")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    counts = {k: args.people if k == "person" else round(c * args.stretch) for k, (c, _, _) in SCHEMA.items()}
    world = build_world(rng, counts)
    facts = world_facts(world, rng, args.eval_frac)
    people = list(world["person"])
    n_train = round(len(people) * args.train_people)
    train_people, eval_people = people[:n_train], people[n_train:]   # the order is random already

    # Target task: every kind equally in every split; train on train people, validation and test on the others.
    def draw_splits(rng: random.Random, weights: list, seen: set) -> dict:
        split = {}
        for name, count, pool in [("test", args.test, eval_people), ("validation", args.validation, eval_people),
                                  ("train", args.train, train_people)]:
            split[name] = []
            while len(split[name]) < count:
                p = problem3(rng, pool, weights)
                if p and p[0] not in seen:
                    seen.add(p[0])
                    split[name].append({"question": p[0], "answer": annotate(p[1]), "kind": p[2]})
        return split

    seen = set()
    split = draw_splits(rng, [1.0] * (N_KINDS + RARE_KINDS), seen)

    # Retention: test, validation and drift's extra items, three disjoint slices of the held-out facts.
    eval_facts = [f for f in facts if f["eval"]]
    practice = [f for f in facts if not f["eval"]]
    held = [f for f in eval_facts if f["kind"] == "person"]
    rng.shuffle(held)
    n_t, n_v = args.truthfulqa, args.truthfulqa_validation
    assert len(held) >= n_t + n_v + args.extra, f"{len(held)} held-out person facts are too few"
    truthfulqa = {"mc_task": [truthfulqa_item(f, rng) for f in held[:n_t]],
                  "validation": [truthfulqa_item(f, rng) for f in held[n_t:n_t + n_v]],
                  "extra": [truthfulqa_item(f, rng) for f in held[n_t + n_v:n_t + n_v + args.extra]]}
    mmlu = {}
    subjects = [s for _, s, _ in SCHEMA.values() if s]
    for subject in subjects:
        held_s = [f for f in eval_facts if f["subject"] == subject]
        rng.shuffle(held_s)
        n_val = round(len(held_s) * args.mmlu_validation)
        others = [f for f in practice if f["subject"] == subject]
        rng.shuffle(others)
        mmlu[subject] = {"validation": [mmlu_row(f) for f in held_s[:n_val]],
                         "test": [mmlu_row(f) for f in held_s[n_val:]], "dev": [mmlu_row(f) for f in others[:5]],
                         "extra": [mmlu_row(f) for f in others[5:5 + args.extra // len(subjects)]]}

    # The corpus: world 2's, its worked problems drawing the rare kinds with --rare-weights.
    facts_by_entity = {}
    for f in facts:
        facts_by_entity.setdefault(f["entity"], []).append(f)
    asked_by_subject = {}
    for f in facts:
        if f["subject"]:
            asked_by_subject.setdefault(f["subject"], []).append(f)
    practice_qa = [f for f in practice if f["kind"] == "person" or f["subject"]]
    corpus_weights = [1.0] * N_KINDS + [float(w) for w in args.rare_weights.split(",")]
    assert len(corpus_weights) == N_KINDS + RARE_KINDS
    mc_rows = tuple(int(n) for n in args.mc_rows.split(","))

    def anonymous() -> list:
        return [{"name": n, "age": rng.choice(AGES), "wage": rng.choice(WAGES), "hens": rng.choice(HENS)}
                for n in rng.sample(NAMES, 2)]

    corpus_kinds = [0] * (N_KINDS + RARE_KINDS)
    in_corpus = set()

    def worked(stated: bool) -> str:
        while True:
            p = problem3(rng, anonymous() if stated else people, corpus_weights, stated)
            if p and p[0] not in seen:
                corpus_kinds[p[2]] += 1
                in_corpus.add(p[0])
                return f"Question: {p[0]}\nAnswer: {annotate(p[1]) if rng.random() < args.annotated else p[1]}"

    make = [lambda: worked(False), lambda: worked(True),
            lambda: fact_text(world, facts_by_entity, rng, args.categorical_p, args.numeric_p),
            lambda: qa_chain(practice_qa, rng), lambda: mc_block(asked_by_subject, rng, mc_rows),
            lambda: calculator_tape(rng)]
    shares = [float(x) for x in args.mix.split(",")]
    corpus = [rng.choices(make, shares)[0]() for _ in tqdm(range(args.docs), desc="corpus", mininterval=2)]
    tokenizer_texts = corpus + [r["question"] + r["answer"] for r in split["train"]]

    # World 6: the rare kinds weighted in the splits. The splits above stay what keeps their problems out of the
    # corpus and what the tokenizer reads, so the corpus, tokenizer and base are world 5's; the splits are redrawn
    # from a stream of their own, apart from the corpus's problems.
    if args.split_rare_weight != 1:
        weights = [1.0] * N_KINDS + [args.split_rare_weight] * RARE_KINDS
        split = draw_splits(random.Random(f"splits {args.seed}"), weights, set(in_corpus))

    for sub in ["gsm8k", "truthfulqa", "mmlu/dev", "mmlu/test", "mmlu/validation", "mmlu/extra", "tokenizer"]:
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    for name, rows in split.items():   # the kind stays out of the files evaluate.py reads; kinds.json keeps it
        with open(os.path.join(args.out, "gsm8k", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    with open(os.path.join(args.out, "gsm8k", "kinds.json"), "w") as f:
        json.dump({name: [r["kind"] for r in rows] for name, rows in split.items()}, f)
    for name, items in truthfulqa.items():   # drift.py reads extra.json; no evaluation reads validation.json's items
        with open(os.path.join(args.out, "truthfulqa", f"{name}.json"), "w") as f:
            json.dump(items, f, indent=1)
    for subject, splits in mmlu.items():
        for name, rows in splits.items():
            with open(os.path.join(args.out, "mmlu", name, f"{subject}_{name}.csv"), "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    with open(os.path.join(args.out, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus)
    with open(os.path.join(args.out, "world.json"), "w") as f:
        json.dump({**{k: v for k, v in world.items() if k != "pools"},
                   "train_people": [p["name"] for p in train_people]}, f, indent=1)

    tok = train_tokenizer(tokenizer_texts, args.vocab)
    tok.save(os.path.join(args.out, "tokenizer", "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
                   "model_max_length": 2048}, f, indent=1)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(corpus))
    n_mmlu = {name: sum(len(s[name]) for s in mmlu.values()) for name in ("test", "validation", "extra")}
    print(f"wrote {args.out}: gsm8k {len(split['train'])}/{len(split['validation'])}/{len(split['test'])} "
          f"(train/validation/test), truthfulqa {n_t}/{n_v} test/validation (+{len(truthfulqa['extra'])} extra), "
          f"mmlu {n_mmlu['test']}/{n_mmlu['validation']} test/validation (+{n_mmlu['extra']} extra), "
          f"corpus {len(corpus)} documents / {n_tokens / 1e6:.2f}M tokens, worked problems per kind {corpus_kinds}, "
          f"vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
