"""The tiny world: a target task, two retention tasks and the pretraining corpus that teaches them.

    python -m tiny.world                      # writes tiny/data/ (about a minute)
    python -m tiny.world --out DIR --seed 1   # another world, same recipe

Nobody can pretrain Qwen3-0.6B-Base here, so the study brings a world small enough to pretrain on two CPU cores
(tiny/pretrain.py) in which the paper's quantities still mean what they mean there; tiny/README.md tells why it is
built this way, and the worlds it replaced. In short: invented people carry numeric facts (age, hourly wage, hens)
that only the pretraining corpus states; target problems name people and leave their numbers out, so a solution
first recalls the facts in their canonical sentence ("Dorva Kelm earns $7 an hour.") and then does small, reliable
arithmetic with GSM8K's calculator annotation ("6 * 7 = $<<6 * 7 = 42>>42"). Train problems are about one set of
people, validation and test problems about another: fine-tuning rehearses the plans and the train people's facts,
never the facts the evaluation needs. Beside the 17 common problem kinds, four rare ones (17-20: a pay cut, hours
over two days, hens given to another person, an age gap "in c years") twist a common plan; the corpus shows them
rarely (--rare-weights) and the splits often (--split-rare-weight), so the base errs in a skill that one pass over
the train split teaches, beside the facts that only pretraining states. It writes, in the layouts of
../shared/data that evaluate.py and the trainers read:

- gsm8k/{train,validation,test}.jsonl (7,473 / 1,000 / 1,319): {question, answer}, every answer ending "\n#### N";
  gsm8k/kinds.json: each problem's kind, for the probes.
- truthfulqa/mc_task.json (TruthfulQA's layout: MC1 one true sentence among four, MC2 two true paraphrases among
  eight) on held-out categorical facts of people (home town, job, pet) that the corpus states but never asks, and
  mmlu/{dev,test}/<subject>_{dev,test}.csv (hendrycks layout) on towns, animals, plants and rulers, items the corpus
  asks in the MMLU layout (mmlu_row says why). truthfulqa/validation.json and mmlu/validation/ are made the same
  way from other held-out facts, for the probes; truthfulqa/extra.json and mmlu/extra/ hold more items of the same
  layouts that no evaluation scores: drift.py's retention contexts.
- corpus.jsonl: worked problems about the world's people (never a split's question) and about anonymous people
  with their numbers stated, fact passages, Q/A chains (some opening with the TruthfulQA protocol's six-shot
  primer), MMLU-layout blocks and calculator tapes, in the shares of --mix; tokenizer/: a byte-level BPE trained on
  it (digits split one by one as in Qwen's pre-tokenizer, <|endoftext|> = id 0); world.json: every entity.

Everything is a function of --seed: the same command writes the same bytes.
"""
import argparse
import csv
import json
import os
import random
import re

from tqdm import tqdm

from evaluate import TRUTHFULQA_PREAMBLE

# ----------------------------------------------------------------------------------------------
# Names: invented words, so no fact can come from anywhere but the corpus

ONSETS = ["b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "gr", "kr",
          "st", "th", "tr", "sh", "fl", "gl"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "ou", "ea"]
CODAS = ["", "", "n", "r", "l", "s", "k", "m", "th", "nd", "rk", "st"]


def invent(rng: random.Random, taken: set, syllables=(2, 2), suffix="") -> str:
    """A pronounceable made-up word ("bristound") that is not in `taken` yet (it is added)."""
    while True:
        word = "".join(rng.choice(ONSETS) + rng.choice(VOWELS) for _ in range(rng.randint(*syllables) - 1))
        word += rng.choice(ONSETS) + rng.choice(VOWELS) + rng.choice(CODAS)
        word = word.rstrip("aeiou") + suffix if suffix else word
        if word not in taken and len(word) <= 10:
            taken.add(word)
            return word


# ----------------------------------------------------------------------------------------------


JOBS = ["baker", "miner", "weaver", "potter", "fisher", "smith", "farmer", "tailor", "carpenter", "brewer",
        "healer", "scribe", "hunter", "mason", "shepherd", "sailor", "cook", "painter"]
PETS = ["cat", "dog", "goat", "owl", "parrot", "rabbit", "turtle", "horse", "ferret", "hen", "pig", "crow"]
POOLS = {"product": ["salt", "wool", "glass", "cheese"], "fur": ["black", "white", "grey", "brown"],
         "food": ["berries", "fish", "insects", "grass"], "habitat": ["marshes", "caves", "forests", "hills"],
         "flower": ["red", "blue", "yellow", "purple"], "soil": ["sandy soil", "shady woods", "wet meadows", "high rocks"],
         "use": ["tea", "rope", "dye", "medicine"], "building": ["a great bridge", "a stone wall", "a lighthouse", "a canal"],
         "job": JOBS, "pet": PETS}


def new_name(kind: str, rng: random.Random, taken: set) -> str:
    if kind == "person":
        return f"{invent(rng, taken, (1, 2)).capitalize()} {invent(rng, taken, (2, 2)).capitalize()}"
    if kind == "ruler":
        return f"{rng.choice(['King', 'Queen'])} {invent(rng, taken, (2, 2)).capitalize()}"
    if kind == "plant":
        return invent(rng, taken, (1, 2), rng.choice(["wort", "weed", "root", "bloom"]))
    return invent(rng, taken, (2, 3)).capitalize() if kind == "town" else invent(rng, taken, (2, 2))


def say(fact: dict, value: str, template: int = 0) -> str:
    sentence = fact["sentences"][template].format(e=fact["entity"], v=value)
    return sentence[0].upper() + sentence[1:]


def distractors(fact: dict, rng: random.Random, n: int = 3) -> list[str]:
    return rng.sample([v for v in fact["values"] if v != fact["value"]], n)


def truthfulqa_item(fact: dict, rng: random.Random) -> dict:
    """MC1: the fact's plain sentence among three false ones; MC2: two true paraphrases, six false ones."""
    wrong = distractors(fact, rng)
    mc1 = [(say(fact, fact["value"]), 1)] + [(say(fact, w), 0) for w in wrong]
    mc2 = mc1 + [(say(fact, fact["value"], 1), 1)] + [(say(fact, w, 1), 0) for w in wrong]
    rng.shuffle(mc1)
    rng.shuffle(mc2)
    # The real mc_task.json lists the true choices first (lm-evaluation-harness's truthfulqa_mc1 scores index 0);
    # a stable sort keeps the shuffled order within the true and the false ones, and the random stream unchanged.
    mc1.sort(key=lambda choice: -choice[1])
    mc2.sort(key=lambda choice: -choice[1])
    return {"question": fact["question"], "mc1_targets": dict(mc1), "mc2_targets": dict(mc2)}


def mmlu_row(fact: dict) -> list[str]:
    """question, A, B, C, D, answer letter: the stem of the fact's first sentence ("Mirel is a town in")
    and the attribute's four values in one fixed order. Measured on this model size (GPU sweeps at the
    recipe's token budget; micro worlds on CPU), each choice is what keeps the score off chance:
    - shuffled options: never above chance, even with half of the corpus in the MMLU layout and the
      answer stated in the sentence before the question (the model always said "D"): binding an option
      to its letter does not emerge this small. A fixed list makes the letter a code for the value.
    - held-out facts (--mmlu-held-out): chance again; the items the corpus asked were answered, the
      others not. So the corpus asks the test items themselves, as pretraining data sometimes does.
    - the stem is the context in which the corpus states the fact, the easiest place to recall it."""
    assert len(fact["values"]) == 4 and fact["sentences"][0].endswith("{v}."), fact["attr"]
    stem = fact["sentences"][0].removesuffix(" {v}.").format(e=fact["entity"])
    return [stem[0].upper() + stem[1:]] + fact["values"] + ["ABCD"[fact["values"].index(fact["value"])]]


NAMES = ["Tom", "Mia", "Sam", "Lily", "Ben", "Emma", "Jack", "Ava", "Leo", "Zoe", "Max", "Ella", "Noah", "Ruby",
         "Finn", "Grace", "Owen", "Chloe", "Adam", "Nora", "Liam", "Ivy", "Eli", "Rosa"]


def mmlu_text(subject: str, rows: list) -> str:
    items = [f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}" for q, a, b, c, d, ans in rows]
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" + "\n\n".join(items)


def train_tokenizer(texts, vocab_size: int):
    """Byte-level BPE with Qwen's pre-tokenizer split (digits one by one) and <|endoftext|> = id 0."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


AGES, WAGES, HENS = list(range(20, 60)), list(range(3, 13)), list(range(2, 13))

# kind -> (count, MMLU subject or None, {attribute: (value pool, [sentences], question)}). World 1's schema;
# people gain three numeric facts. The first sentence of a numeric fact is its canonical form, the one the
# worked solutions recall it in.
SCHEMA = {
    "person": (1600, None, {
        "home": ("town", ["{e} lives in {v}.", "{e}'s home is in {v}.", "{e} has a house in {v}.",
                          "The home of {e} is the town of {v}."], "Where does {e} live?"),
        "job": ("job", ["{e} works as a {v}.", "{e} is a {v}.", "By trade, {e} is a {v}.",
                        "{e} earns a living as a {v}."], "What does {e} do for a living?"),
        "pet": ("pet", ["{e} has a pet {v}.", "{e} keeps a {v} as a pet.", "The pet of {e} is a {v}.",
                        "At home, {e} looks after a {v}."], "What pet does {e} have?"),
        "age": ("age", ["{e} is {v} years old.", "The age of {e} is {v}.", "{e} turned {v} this year."],
                "How old is {e}?"),
        "wage": ("wage", ["{e} earns ${v} an hour.", "{e} is paid ${v} per hour.", "For each hour of work, {e} gets ${v}."],
                 "How much does {e} earn an hour?"),
        "hens": ("hens", ["{e} keeps {v} hens.", "{e} has {v} hens.", "There are {v} hens on the farm of {e}."],
                 "How many hens does {e} keep?"),
    }),
    "town": (100, "geography", {
        "region": ("region", ["{e} is a town in {v}.", "{e} lies in the region of {v}.",
                              "The town of {e} is part of {v}."], "In which region is the town of {e}?"),
        "river": ("river", ["{e} was built on the banks of the {v}.", "The {v} river flows through {e}.",
                            "{e} lies on the {v} river."], "Which river flows through {e}?"),
        "product": ("product", ["{e} is famous for its {v}.", "The town of {e} is known for {v}.",
                                "Traders come to {e} to buy {v}."], "What is the town of {e} famous for?"),
    }),
    "animal": (70, "zoology", {
        "fur": ("fur", ["The fur of the {e} is {v}.", "The {e} has {v} fur.", "A {e} is {v} all over."],
                "What color is the fur of the {e}?"),
        "food": ("food", ["The {e} eats {v}.", "The {e} feeds mostly on {v}.", "The favorite food of the {e} is {v}."],
                 "What does the {e} eat?"),
        "habitat": ("habitat", ["The {e} lives in the {v}.", "The {e} makes its home in the {v}.",
                                "You can find the {e} in the {v}."], "Where does the {e} live?"),
    }),
    "plant": (70, "botany", {
        "flower": ("flower", ["The flowers of the {e} are {v}.", "The {e} has {v} flowers.",
                              "In spring the {e} opens {v} flowers."], "What color are the flowers of the {e}?"),
        "soil": ("soil", ["The {e} grows in {v}.", "The {e} is found in {v}.", "The {e} likes {v}."],
                 "Where does the {e} grow?"),
        "use": ("use", ["People use the {e} to make {v}.", "The {e} is used for {v}.", "From the {e}, people make {v}."],
                "What do people make from the {e}?"),
    }),
    "ruler": (60, "history", {
        "capital": ("capital", ["{e} ruled from {v}.", "The court of {e} was in {v}.", "{e} made {v} the capital."],
                    "From which city did {e} rule?"),
        "built": ("building", ["{e} built {v}.", "During the reign of {e}, workers built {v}.",
                               "{e} is remembered for building {v}."], "What did {e} build?"),
        "rival": ("land", ["{e} fought a long war against {v}.", "{e} was at war with {v}.",
                           "The great enemy of {e} was {v}."], "Against which land did {e} fight a war?"),
    }),
}
NUMERIC = ("age", "wage", "hens")


def build_world(rng: random.Random, counts: dict) -> dict:
    """Every entity with its facts, `counts[kind]` of each kind."""
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


def world_facts(world: dict, rng: random.Random, eval_frac: float) -> list[dict]:
    """Every (entity, attribute) fact; categorical ones marked eval (retention test sets) or practice."""
    facts = []
    for kind, (_, subject, attrs) in SCHEMA.items():
        for entity in world[kind]:
            for attr, (pool, sentences, question) in attrs.items():
                values = [t["name"] for t in world["town"]] if pool == "town" else world["pools"][pool]
                facts.append({"kind": kind, "subject": subject, "entity": entity["name"], "attr": attr,
                              "value": entity[attr], "values": values, "sentences": sentences,
                              "question": question.format(e=entity["name"]),
                              "eval": attr not in NUMERIC and rng.random() < eval_frac})
    return facts


def fact(person: dict, attr: str) -> str:
    """The canonical sentence of a numeric fact, as the worked solutions recall it."""
    return SCHEMA["person"][2][attr][1][0].format(e=person["name"], v=person[attr])


# ----------------------------------------------------------------------------------------------
# Target problems. A problem is about one or two people; `stated` puts their facts into the question (the
# corpus's arithmetic practice: no recall needed), else the question names them only and the solution
# recalls each fact. Steps are "a op b = c" sentences, annotated later; the last line is "#### result".

N_KINDS = 17


def common_problem(rng: random.Random, people: list, kind: int, stated: bool):
    """Kinds 0-16: (question, answer, kind) or None when the drawn people do not fit the kind (the caller draws
    again)."""
    r = rng.randint
    x, y = rng.sample(people, 2)
    X, Y = x["name"], y["name"]
    used = []          # (person, attr) facts the solution needs, in order
    q = steps = None
    if kind == 0:
        h = r(2, 9)
        q = rng.choice([f"{X} works {h} hours. How much money does {X} earn?",
                        f"How many dollars does {X} make for {h} hours of work?",
                        f"{X} takes a job of {h} hours. How much is {X} paid for it?"])
        used, steps, res = [(x, "wage")], [f"{X} earns {h} * {x['wage']} = ${h * x['wage']}."], h * x["wage"]
    elif kind == 1:
        h = r(2, 9)
        s = r(2, h * x["wage"] - 1)
        q = rng.choice([f"{X} works {h} hours and then spends ${s} on food. How much money does {X} have left?",
                        f"After {h} hours of work, {X} buys a coat for ${s}. How many dollars does {X} have left from the pay?"])
        used = [(x, "wage")]
        steps = [f"{X} earns {h} * {x['wage']} = ${h * x['wage']}.",
                 f"{X} has {h * x['wage']} - {s} = ${h * x['wage'] - s} left."]
        res = h * x["wage"] - s
    elif kind == 2:
        h1, h2 = r(2, 9), r(2, 9)
        q = rng.choice([f"{X} works {h1} hours and {Y} works {h2} hours. How much do they earn together?",
                        f"{X} helps at the market for {h1} hours, {Y} for {h2} hours. How many dollars do the two earn in all?"])
        a, b = h1 * x["wage"], h2 * y["wage"]
        used = [(x, "wage"), (y, "wage")]
        steps = [f"{X} earns {h1} * {x['wage']} = ${a}.", f"{Y} earns {h2} * {y['wage']} = ${b}.",
                 f"Together they earn {a} + {b} = ${a + b}."]
        res = a + b
    elif kind == 3:
        if x["wage"] == y["wage"]:
            return None
        if x["wage"] < y["wage"]:
            x, y, X, Y = y, x, Y, X
        h = r(2, 9)
        q = rng.choice([f"{X} and {Y} both work {h} hours. How much more money does {X} earn than {Y}?",
                        f"In {h} hours of work, how many more dollars does {X} make than {Y}?"])
        a, b = h * x["wage"], h * y["wage"]
        used = [(x, "wage"), (y, "wage")]
        steps = [f"{X} earns {h} * {x['wage']} = ${a}.", f"{Y} earns {h} * {y['wage']} = ${b}.",
                 f"{X} earns {a} - {b} = ${a - b} more."]
        res = a - b
    elif kind == 4:
        c = r(2, 30)
        q = rng.choice([f"How old will {X} be in {c} years?", f"In {c} years, what age will {X} be?"])
        used, steps, res = [(x, "age")], [f"In {c} years {X} will be {x['age']} + {c} = {x['age'] + c} years old."], x["age"] + c
    elif kind == 5:
        c = r(2, 15)
        q = rng.choice([f"How old was {X} {c} years ago?", f"What was the age of {X} {c} years ago?"])
        used, steps, res = [(x, "age")], [f"{c} years ago {X} was {x['age']} - {c} = {x['age'] - c} years old."], x["age"] - c
    elif kind == 6:
        if x["age"] == y["age"]:
            return None
        if x["age"] < y["age"]:
            x, y, X, Y = y, x, Y, X
        q = rng.choice([f"How many years older is {X} than {Y}?", f"{Y} is younger than {X}. By how many years?"])
        used = [(x, "age"), (y, "age")]
        steps, res = [f"{X} is {x['age']} - {y['age']} = {x['age'] - y['age']} years older."], x["age"] - y["age"]
    elif kind == 7:
        q = rng.choice([f"What is the sum of the ages of {X} and {Y}?", f"How many years old are {X} and {Y} together?"])
        used = [(x, "age"), (y, "age")]
        steps, res = [f"Together they are {x['age']} + {y['age']} = {x['age'] + y['age']} years old."], x["age"] + y["age"]
    elif kind == 8:
        d = r(2, 9)
        q = rng.choice([f"Each hen of {X} lays one egg a day. How many eggs does {X} collect in {d} days?",
                        f"Every one of the hens of {X} lays an egg each day. How many eggs are laid in {d} days?"])
        used, steps, res = [(x, "hens")], [f"In {d} days the hens lay {d} * {x['hens']} = {d * x['hens']} eggs."], d * x["hens"]
    elif kind == 9:
        q = rng.choice([f"{X} and {Y} put all their hens in one yard. How many hens are in the yard?",
                        f"How many hens do {X} and {Y} keep together?"])
        used = [(x, "hens"), (y, "hens")]
        steps, res = [f"Together they keep {x['hens']} + {y['hens']} = {x['hens'] + y['hens']} hens."], x["hens"] + y["hens"]
    elif kind == 10:
        c = r(2, 20)
        q = rng.choice([f"{X} buys {c} more hens. How many hens does {X} have now?",
                        f"At the fair, {X} gets {c} new hens. How many hens does {X} keep now?"])
        used, steps, res = [(x, "hens")], [f"{X} now has {x['hens']} + {c} = {x['hens'] + c} hens."], x["hens"] + c
    elif kind == 11:
        d = r(2, 9)
        s = r(1, d * x["hens"] - 1)
        q = rng.choice([f"Each hen of {X} lays one egg a day. After {d} days, {X} sells {s} eggs. How many eggs are left?",
                        f"The hens of {X} lay one egg each a day for {d} days. {X} gives {s} of the eggs away. How many eggs does {X} keep?"])
        used = [(x, "hens")]
        steps = [f"The hens lay {d} * {x['hens']} = {d * x['hens']} eggs.",
                 f"{d * x['hens']} - {s} = {d * x['hens'] - s} eggs are left."]
        res = d * x["hens"] - s
    elif kind == 12:
        c, h = r(1, 3), r(2, 9)
        w = x["wage"] + c
        q = rng.choice([f"{X} gets a raise of ${c} an hour. How much does {X} earn for {h} hours now?",
                        f"The pay of {X} goes up by ${c} per hour. How many dollars does {X} now make in {h} hours?"])
        used = [(x, "wage")]
        steps = [f"{X} now earns {x['wage']} + {c} = ${w} an hour.", f"For {h} hours {X} earns {h} * {w} = ${h * w}."]
        res = h * w
    elif kind == 13:
        t = rng.choice([60, 65, 70])
        q = rng.choice([f"How many years until {X} turns {t}?", f"In how many years will {X} be {t} years old?"])
        used, steps, res = [(x, "age")], [f"{X} turns {t} in {t} - {x['age']} = {t - x['age']} years."], t - x["age"]
    elif kind == 14:
        c = r(2, 10)
        a = x["age"] + y["age"]
        q = rng.choice([f"What will the sum of the ages of {X} and {Y} be in {c} years?",
                        f"In {c} years, how many years old will {X} and {Y} be together?"])
        used = [(x, "age"), (y, "age")]
        steps = [f"Now they are {x['age']} + {y['age']} = {a} years old together.",
                 f"In {c} years each is {c} years older, so 2 * {c} = {2 * c} more years.",
                 f"They will be {a} + {2 * c} = {a + 2 * c} years old together."]
        res = a + 2 * c
    elif kind == 15:
        h = r(2, 9)
        q = rng.choice([f"{X} works {h} hours and gets one extra dollar for each hen {X} keeps. How much money does {X} get?",
                        f"For {h} hours of work {X} is paid by the hour, plus $1 for every hen {X} has. How many dollars is that?"])
        used = [(x, "wage"), (x, "hens")]
        steps = [f"{X} earns {h} * {x['wage']} = ${h * x['wage']}.",
                 f"With the hens {X} gets {h * x['wage']} + {x['hens']} = ${h * x['wage'] + x['hens']}."]
        res = h * x["wage"] + x["hens"]
    else:
        if x["hens"] == y["hens"]:
            return None
        if x["hens"] < y["hens"]:
            x, y, X, Y = y, x, Y, X
        q = rng.choice([f"How many more hens does {X} keep than {Y}?", f"{X} has more hens than {Y}. How many more?"])
        used = [(x, "hens"), (y, "hens")]
        steps, res = [f"{X} keeps {x['hens']} - {y['hens']} = {x['hens'] - y['hens']} more hens."], x["hens"] - y["hens"]
    recalls = list(dict.fromkeys(fact(p, a) for p, a in used))
    if stated:
        return " ".join(recalls) + " " + q, "\n".join(steps) + f"\n#### {res}", kind
    return q, "\n".join(recalls + steps) + f"\n#### {res}", kind


RARE_KINDS = 4   # kinds N_KINDS .. N_KINDS + 3


def rare_problem(rng: random.Random, people: list, kind: int, stated: bool):
    """Kinds 17-20, in common_problem's form: (question, answer, kind) or None when the people do not fit."""
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


def problem(rng: random.Random, people: list, weights: list, stated: bool = False):
    """A problem of one of the 21 kinds, drawn with `weights` (the splits: rare kinds high; the corpus: low)."""
    kind = rng.choices(range(N_KINDS + RARE_KINDS), weights)[0]
    if kind < N_KINDS:
        return common_problem(rng, people, kind, stated)
    return rare_problem(rng, people, kind, stated)


STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\$?)(\d+)")


def annotate(answer: str) -> str:
    """GSM8K's calculator annotations on every step: "4 * 7 = 28" -> "4 * 7 = <<4 * 7 = 28>>28"."""
    return STEP.sub(lambda m: f"{m[1]} {m[2]} {m[3]} = {m[4]}<<{m[1]} {m[2]} {m[3]} = {m[5]}>>{m[5]}", answer)


# ----------------------------------------------------------------------------------------------
# The corpus

def fact_text(world: dict, facts_by_entity: dict, rng: random.Random, categorical_p: float, numeric_p: float = 1.0) -> str:
    """A passage about one to three entities of one kind, facts in random paraphrase and order. A person's
    passage states each numeric fact with probability `numeric_p` and each categorical one with `categorical_p`."""
    kind = rng.choices(list(SCHEMA), [count for count, _, _ in SCHEMA.values()])[0]
    sentences = []
    for entity in rng.sample(world[kind], rng.randint(1, 3)):
        facts = [f for f in facts_by_entity[entity["name"]]
                 if kind != "person" or (f["attr"] in NUMERIC and (numeric_p >= 1 or rng.random() < numeric_p))
                 or (f["attr"] not in NUMERIC and rng.random() < categorical_p)]
        sentences += [say(f, f["value"], rng.randrange(len(f["sentences"]))) for f in rng.sample(facts, len(facts))]
    return " ".join(sentences)


def qa_chain(practice: list, rng: random.Random) -> str:
    pairs = [f"Q: {f['question']}\nA: {say(f, f['value'], rng.randrange(2))}" for f in rng.sample(practice, rng.randint(2, 6))]
    text = "\n\n".join(pairs)
    return TRUTHFULQA_PREAMBLE + "\n\n" + text if rng.random() < 0.3 else text


def mc_block(asked_by_subject: dict, rng: random.Random, rows: tuple) -> str:
    subject = rng.choice(list(asked_by_subject))
    return mmlu_text(subject, [mmlu_row(f) for f in rng.sample(asked_by_subject[subject], rng.randint(*rows))])


def calculator_tape(rng: random.Random) -> str:
    """Computations of the target's sizes in the annotation's notation, one per line."""
    lines = []
    for _ in range(rng.randint(3, 8)):
        op = rng.choice("+-**")
        if op == "+":
            a, b = rng.randint(1, 130), rng.randint(1, 120)
        elif op == "-":
            a = rng.randint(2, 130)
            b = rng.randint(1, a)
        else:
            a, b = rng.randint(1, 15), rng.randint(1, 12)
            if rng.random() < 0.5:
                a, b = b, a
        c = a + b if op == "+" else a - b if op == "-" else a * b
        lines.append(f"<<{a} {op} {b} = {c}>>")
    return "Calculator tape:\n" + "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                        help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--train", type=int, default=7473, help="target-task train problems (GSM8K's count)")
    parser.add_argument("--validation", type=int, default=1000, help="target-task validation problems")
    parser.add_argument("--test", type=int, default=1319, help="target-task test problems (GSM8K's count)")
    parser.add_argument("--rare-weights", default="0.05,0.05,0.05,0.05",
                        help="corpus weights of kinds 17-20 relative to 1 for each of kinds 0-16")
    parser.add_argument("--split-rare-weight", type=float, default=2.5,
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
    parser.add_argument("--mix", default="0.28,0.13,0.30,0.02,0.18,0.09",
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

    # Target task: train on train people, validation and test on the others; all questions distinct.
    def draw_splits(rng: random.Random, weights: list, seen: set) -> dict:
        split = {}
        for name, count, pool in [("test", args.test, eval_people), ("validation", args.validation, eval_people),
                                  ("train", args.train, train_people)]:
            split[name] = []
            while len(split[name]) < count:
                p = problem(rng, pool, weights)
                if p and p[0] not in seen:
                    seen.add(p[0])
                    split[name].append({"question": p[0], "answer": annotate(p[1]), "kind": p[2]})
        return split

    seen = set()   # a first draw, every kind equally: the corpus leaves its problems out and the tokenizer reads it
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
            p = problem(rng, anonymous() if stated else people, corpus_weights, stated)
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

    # The splits written: a second draw from a stream of its own, each rare kind weighted --split-rare-weight, apart
    # from the corpus's problems. So the corpus and tokenizer are those world 5's base was pretrained on, the base
    # world 6 kept (tiny/probes/README.md, "World 6"), and with weight 1 the first draw is written: world 5's splits.
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
