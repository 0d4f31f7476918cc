"""The tiny world: a target task, two retention tasks and the pretraining corpus that teaches them.

    python -m tiny.world                      # writes tiny/data/ (about a minute)
    python -m tiny.world --out DIR --seed 1   # another world, same recipe

Nobody can pretrain Qwen3-0.6B-Base here, so the study brings a world small enough to pretrain on two
CPU cores (tiny/pretrain.py) in which the paper's quantities still mean what they mean there; tiny/README.md
tells why it is built this way and which worlds were tried and dropped. It writes, in exactly the layouts
of ../shared/data that evaluate.py and the trainers read:

- gsm8k/{train,test}.jsonl, the target task: {question, answer} arithmetic word problems of one to three
  steps; every answer shows its steps and ends with "\n#### N". Like the real GSM8K's, each step carries a
  calculator annotation that repeats the computation ("He earns 28 * 26 = $<<28 * 26 = 728>>728."), a
  style the corpus's own worked problems use only rarely (--annotated, 3%).
- Two retention tasks on the facts of an invented world (people, towns, animals, plants, rulers with
  three attributes each), facts that the corpus states in several paraphrases and in random order, so
  the base model knows them only from pretraining and target-task fine-tuning can only damage them:
  * truthfulqa/mc_task.json (TruthfulQA's layout): "Where does Bora Kelm live?", each choice a sentence
    ("Bora Kelm lives in Mirel."), MC1 one true among four, MC2 two true paraphrases among eight. These
    facts are held out: the corpus states them but never asks them (it asks other people's facts in
    "Q: ...\nA: ..." chains), so the score is knowledge recalled, not an item memorized.
  * mmlu/{dev,test}/<subject>_{dev,test}.csv (hendrycks layout: no header, answer letter), subjects
    geography, zoology, botany, history: sentence-completion items ("Mirel is a town in") whose four
    options are the attribute's four values in one fixed order. The corpus asks these very items in the
    MMLU layout (see mmlu_row for why a model this small needs all three choices), so this score is
    a memorized, format-bound answer: the kind of retention fine-tuning damages first.
- corpus.jsonl ({"text"} per document): word problems in the evaluation's "Question: ...\nAnswer: ..."
  format (never a train or test question), fact passages, Q/A chains, MMLU-layout blocks, calculator
  tapes ("<<16 * 58 = 928>>" lines). Some Q/A chains
  open with the fixed six-shot primer that the TruthfulQA protocol puts before every question, as web
  text would: the tiny model should not meet its first real English words at evaluation time.
- tokenizer/: a byte-level BPE (`tokenizers`) trained on the corpus, digits split one by one as in Qwen's
  pre-tokenizer, <|endoftext|> (id 0) as EOS and padding; world.json: every entity and its attributes.

Everything is a function of --seed: the same command writes the same bytes.
"""
import argparse
import csv
import json
import os
import random
import re

from tqdm import tqdm

from evaluate import TRUTHFULQA_PREAMBLE  # the fixed six-shot primer of the TruthfulQA protocol

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
# The world: entities of five kinds, each with three attributes. Per attribute: the pool of values,
# the sentences that state it in the corpus, and the question that asks it. The four MMLU subjects'
# attributes have exactly four values, listed as the options A-D in one fixed order (see mmlu_row).

JOBS = ["baker", "miner", "weaver", "potter", "fisher", "smith", "farmer", "tailor", "carpenter", "brewer",
        "healer", "scribe", "hunter", "mason", "shepherd", "sailor", "cook", "painter"]
PETS = ["cat", "dog", "goat", "owl", "parrot", "rabbit", "turtle", "horse", "ferret", "hen", "pig", "crow"]
POOLS = {"product": ["salt", "wool", "glass", "cheese"], "fur": ["black", "white", "grey", "brown"],
         "food": ["berries", "fish", "insects", "grass"], "habitat": ["marshes", "caves", "forests", "hills"],
         "flower": ["red", "blue", "yellow", "purple"], "soil": ["sandy soil", "shady woods", "wet meadows", "high rocks"],
         "use": ["tea", "rope", "dye", "medicine"], "building": ["a great bridge", "a stone wall", "a lighthouse", "a canal"],
         "job": JOBS, "pet": PETS}

# kind -> (count, MMLU subject or None, {attribute: (value pool, [sentences], question)})
SCHEMA = {
    "person": (3200, None, {
        "home": ("town", ["{e} lives in {v}.", "{e}'s home is in {v}.", "{e} has a house in {v}.",
                          "The home of {e} is the town of {v}."], "Where does {e} live?"),
        "job": ("job", ["{e} works as a {v}.", "{e} is a {v}.", "By trade, {e} is a {v}.",
                        "{e} earns a living as a {v}."], "What does {e} do for a living?"),
        "pet": ("pet", ["{e} has a pet {v}.", "{e} keeps a {v} as a pet.", "The pet of {e} is a {v}.",
                        "At home, {e} looks after a {v}."], "What pet does {e} have?"),
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


def new_name(kind: str, rng: random.Random, taken: set) -> str:
    if kind == "person":
        return f"{invent(rng, taken, (1, 2)).capitalize()} {invent(rng, taken, (2, 2)).capitalize()}"
    if kind == "ruler":
        return f"{rng.choice(['King', 'Queen'])} {invent(rng, taken, (2, 2)).capitalize()}"
    if kind == "plant":
        return invent(rng, taken, (1, 2), rng.choice(["wort", "weed", "root", "bloom"]))
    return invent(rng, taken, (2, 3)).capitalize() if kind == "town" else invent(rng, taken, (2, 2))


def build_world(rng: random.Random, size: float = 1.0) -> dict:
    """Names and attribute values for every entity: {kind: [{"name", attr: value, ...}], "pools": {...}}."""
    taken = set()
    pools = dict(POOLS, region=[invent(rng, taken, (2, 3)).capitalize() for _ in range(4)],
                 river=[invent(rng, taken, (2, 2)).capitalize() for _ in range(4)],
                 capital=[invent(rng, taken, (2, 3)).capitalize() for _ in range(4)],
                 land=[invent(rng, taken, (2, 3), "ia").capitalize() for _ in range(4)])
    world = {"pools": pools}
    for kind in ["town", "person", "animal", "plant", "ruler"]:  # towns first: people live in them
        count, _, attrs = SCHEMA[kind]
        world[kind] = []
        for _ in range(round(count * size)):
            entity = {"name": new_name(kind, rng, taken)}
            for attr, (pool, _, _) in attrs.items():
                entity[attr] = rng.choice([t["name"] for t in world["town"]] if pool == "town" else pools[pool])
            world[kind].append(entity)
    return world


def world_facts(world: dict, rng: random.Random, eval_frac: float) -> list[dict]:
    """Every (entity, attribute) fact, each marked eval (goes to a test set) or practice."""
    facts = []
    for kind, (_, subject, attrs) in SCHEMA.items():
        for entity in world[kind]:
            for attr, (pool, sentences, question) in attrs.items():
                values = [t["name"] for t in world["town"]] if pool == "town" else world["pools"][pool]
                facts.append({"kind": kind, "subject": subject, "entity": entity["name"], "attr": attr,
                              "value": entity[attr], "values": values, "sentences": sentences,
                              "question": question.format(e=entity["name"]), "eval": rng.random() < eval_frac})
    return facts


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


# ----------------------------------------------------------------------------------------------
# Target task: arithmetic word problems in GSM8K's style. Each template returns (question, steps,
# result); a step is a sentence with "a op b = c" in it, the last line is "#### result".

NAMES = ["Tom", "Mia", "Sam", "Lily", "Ben", "Emma", "Jack", "Ava", "Leo", "Zoe", "Max", "Ella", "Noah", "Ruby",
         "Finn", "Grace", "Owen", "Chloe", "Adam", "Nora", "Liam", "Ivy", "Eli", "Rosa"]
HE = {n: ("she" if n in {"Mia", "Lily", "Emma", "Ava", "Zoe", "Ella", "Ruby", "Grace", "Chloe", "Nora", "Ivy",
                         "Rosa"} else "he") for n in NAMES}
ITEMS = ["apples", "marbles", "stickers", "cookies", "pencils", "books", "shells", "cards", "eggs", "stamps",
         "beads", "candies", "flowers", "toy cars", "balloons", "oranges"]
GOODS = [("notebook", "notebooks"), ("pen", "pens"), ("toy", "toys"), ("shirt", "shirts"), ("cake", "cakes"),
         ("ticket", "tickets"), ("book", "books"), ("hat", "hats")]


def problem(rng: random.Random, scale: float = 3.0) -> tuple[str, str]:
    """One word problem; `scale` stretches the quantities (the task's difficulty), not the small factors."""
    n, m = rng.sample(NAMES, 2)
    p = HE[n]
    P = p.capitalize()
    item = rng.choice(ITEMS)
    one, many = rng.choice(GOODS)
    r = rng.randint

    def big(lo, hi):
        return rng.randint(lo, max(lo + 1, round(hi * scale)))

    kind = rng.randrange(14)
    if kind == 0:
        a, b = big(5, 90), big(5, 90)
        q = f"{n} has {a} {item}. {P} buys {b} more. How many {item} does {n} have now?"
        steps, res = [f"{n} has {a} + {b} = {a + b} {item} now."], a + b
    elif kind == 1:
        a = big(20, 150); b = r(3, a - 2)
        q = f"{n} had {a} {item} and gave {b} of them to {m}. How many {item} does {n} have left?"
        steps, res = [f"{n} has {a} - {b} = {a - b} {item} left."], a - b
    elif kind == 2:
        a, b = big(3, 25), r(2, 9)
        q = f"There are {a} {item} in each box. How many {item} are there in {b} boxes?"
        steps, res = [f"{b} boxes hold {b} * {a} = {a * b} {item}."], a * b
    elif kind == 3:
        a, b = big(2, 15), r(2, 9)
        q = f"{n} shares {a * b} {item} equally among {b} friends. How many {item} does each friend get?"
        steps, res = [f"Each friend gets {a * b} / {b} = {a} {item}."], a
    elif kind == 4:
        a, k = big(4, 40), r(2, 4)
        word = {2: "twice", 3: "three times", 4: "four times"}[k]
        q = f"{n} picks {a} {item} on Monday and {word} as many on Tuesday. How many {item} does {p} pick in total?"
        steps = [f"On Tuesday {p} picks {a} * {k} = {a * k} {item}.",
                 f"In total {p} picks {a} + {a * k} = {a + a * k} {item}."]
        res = a + a * k
    elif kind == 5:
        a, b = r(2, 9), big(2, 15)
        bill = next(x for x in (20, 50, 100, 200, 500, 1000, 2000) if x > a * b)
        q = f"{n} buys {a} {many} that cost ${b} each and pays with a ${bill} bill. How much change does {p} get?"
        steps = [f"The {many} cost {a} * {b} = ${a * b}.", f"{P} gets {bill} - {a * b} = ${bill - a * b} in change."]
        res = bill - a * b
    elif kind == 6:
        a, w = big(2, 12), r(2, 5)
        q = f"{n} reads {a} pages every day. How many pages does {p} read in {w} weeks?"
        steps = [f"In one week {p} reads {a} * 7 = {a * 7} pages.", f"In {w} weeks {p} reads {a * 7} * {w} = {a * 7 * w} pages."]
        res = a * 7 * w
    elif kind == 7:
        a, b, c, d = r(2, 6), big(3, 12), r(2, 6), big(3, 12)
        q = f"{n} buys {a} packs of {b} {item} and {c} packs of {d} {item}. How many {item} does {p} buy?"
        steps = [f"The first packs hold {a} * {b} = {a * b} {item}.", f"The other packs hold {c} * {d} = {c * d} {item}.",
                 f"{P} buys {a * b} + {c * d} = {a * b + c * d} {item}."]
        res = a * b + c * d
    elif kind == 8:
        c, k = r(2, 12), big(2, 9)
        b = big(2, 40)
        a = c * k + b
        q = f"A farmer has {a} eggs. He sells {b} of them and puts the rest into cartons of {c}. How many cartons does he fill?"
        steps = [f"He has {a} - {b} = {a - b} eggs left.", f"He fills {a - b} / {c} = {k} cartons."]
        res = k
    elif kind == 9:
        h = big(10, 80); b = r(2, h - 1)
        q = f"{n} has ${2 * h}. {P} spends half of it on a {one} and ${b} on lunch. How much money does {p} have left?"
        steps = [f"The {one} costs {2 * h} / 2 = ${h}.", f"{P} has {h} - {b} = ${h - b} left."]
        res = h - b
    elif kind == 10:
        a, b, c = r(4, 40), r(2, 30), r(2, 20)
        q = f"{n} is {a} years old. {m} is {b} years older than {n}. How old will {m} be in {c} years?"
        steps = [f"{m} is {a} + {b} = {a + b} years old.", f"In {c} years {m} will be {a + b} + {c} = {a + b + c} years old."]
        res = a + b + c
    elif kind == 11:
        a, b, c = r(2, 8), r(2, 6), big(5, 20)
        d = r(5, a * b * c - 1)
        q = (f"{n} works {a} hours a day for {b} days and earns ${c} per hour. {P} spends ${d}. "
             f"How much money does {p} have left?")
        steps = [f"{P} works {a} * {b} = {a * b} hours.", f"{P} earns {a * b} * {c} = ${a * b * c}.",
                 f"{P} has {a * b * c} - {d} = ${a * b * c - d} left."]
        res = a * b * c - d
    elif kind == 12:
        a, b = big(3, 15), r(3, 15)
        c = r(2, a * b - 1)
        q = f"A garden has {a} rows of {b} plants. {c} of the plants die. How many plants are left?"
        steps = [f"The garden has {a} * {b} = {a * b} plants.", f"{a * b} - {c} = {a * b - c} plants are left."]
        res = a * b - c
    else:
        a = big(15, 99); b = r(2, a - 5)
        q = f"{n} has {a} {item}. {m} has {b} fewer {item} than {n}. How many {item} do they have together?"
        steps = [f"{m} has {a} - {b} = {a - b} {item}.", f"Together they have {a} + {a - b} = {a + a - b} {item}."]
        res = a + a - b
    return q, "\n".join(steps) + f"\n#### {res}"


STEP = re.compile(r"(\d+) ([-+*/]) (\d+) = (\$?)(\d+)")


def annotate(answer: str) -> str:
    """GSM8K's calculator annotations on every step: "4 * 7 = 28" -> "4 * 7 = <<4 * 7 = 28>>28"."""
    return STEP.sub(lambda m: f"{m[1]} {m[2]} {m[3]} = {m[4]}<<{m[1]} {m[2]} {m[3]} = {m[5]}>>{m[5]}", answer)


# ----------------------------------------------------------------------------------------------
# The corpus

def corpus_problem(rng: random.Random, exclude: set, scale: float, annotated: float) -> str:
    """A worked problem, in the world's plain style or, with probability `annotated`, in GSM8K's."""
    while True:
        q, a = problem(rng, scale)
        if q not in exclude:
            return f"Question: {q}\nAnswer: {annotate(a) if rng.random() < annotated else a}"


def fact_text(world: dict, facts_by_entity: dict, rng: random.Random) -> str:
    """A short passage about one to three entities of one kind: every fact once, random paraphrase and order.
    Kinds are drawn in proportion to their size, so every entity is described about equally often."""
    kind = rng.choices(list(SCHEMA), [count for count, _, _ in SCHEMA.values()])[0]
    sentences = []
    for entity in rng.sample(world[kind], rng.randint(1, 3)):
        facts = facts_by_entity[entity["name"]]
        sentences += [say(f, f["value"], rng.randrange(len(f["sentences"]))) for f in rng.sample(facts, len(facts))]
    return " ".join(sentences)


def qa_chain(practice: list, rng: random.Random) -> str:
    pairs = [f"Q: {f['question']}\nA: {say(f, f['value'], rng.randrange(2))}" for f in rng.sample(practice, rng.randint(2, 6))]
    text = "\n\n".join(pairs)
    return TRUTHFULQA_PREAMBLE + "\n\n" + text if rng.random() < 0.3 else text


def mmlu_text(subject: str, rows: list) -> str:
    items = [f"{q}\nA. {a}\nB. {b}\nC. {c}\nD. {d}\nAnswer: {ans}" for q, a, b, c, d, ans in rows]
    return f"The following are multiple choice questions (with answers) about {subject}.\n\n" + "\n\n".join(items)


def mc_block(asked_by_subject: dict, rng: random.Random) -> str:
    """One to four facts of one subject asked in the MMLU layout, answers included."""
    subject = rng.choice(list(asked_by_subject))
    return mmlu_text(subject, [mmlu_row(f) for f in rng.sample(asked_by_subject[subject], rng.randint(1, 4))])


def calculator_tape(rng: random.Random) -> str:
    """A few computations in calculator notation ("<<16 * 58 = 928>>"), one per line: with the few annotated
    worked problems (--annotated), the corpus's only use of the notation. The base so knows its tokens (a LoRA
    adapter cannot teach a frozen, tied embedding a token it never saw) but not GSM8K's habit of annotating
    every step."""
    lines = []
    for _ in range(rng.randint(2, 6)):
        op = rng.choice("+-*/")
        if op == "+":
            a, b = rng.randint(1, 400), rng.randint(1, 400)
        elif op == "-":
            a = rng.randint(10, 500)
            b = rng.randint(1, a)
        elif op == "*":
            a, b = rng.randint(2, 99), rng.randint(2, 60)
        else:
            b, q = rng.randint(2, 12), rng.randint(2, 60)
            a = b * q
        c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if op == "/" else 0}[op]
        lines.append(f"<<{a} {op} {b} = {c}>>")
    return "Calculator tape:\n" + "\n".join(lines)


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "data"),
                        help="output directory")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of this seed")
    parser.add_argument("--train", type=int, default=7473, help="target-task train problems (GSM8K's count)")
    parser.add_argument("--test", type=int, default=1319, help="target-task test problems (GSM8K's count)")
    parser.add_argument("--validation", type=int, default=500,
                        help="target-task validation problems (settings are chosen on them; drawn last, from a stream "
                             "of their own, so every other file is what it was before the split existed)")
    parser.add_argument("--eval-frac", type=float, default=0.6, help="fraction of facts in the test sets")
    parser.add_argument("--truthfulqa", type=int, default=817, help="TruthfulQA items to write (the real count)")
    parser.add_argument("--extra", type=int, default=64, help="retention contexts of each task that no evaluation scores")
    parser.add_argument("--docs", type=int, default=150_000, help="corpus documents")
    parser.add_argument("--mix", default="0.34,0.4,0.1,0.14,0.02",
                        help="corpus shares of documents: problems,facts,qa,mc,calculator tapes")
    parser.add_argument("--mmlu-held-out", action="store_true",
                        help="never ask the MMLU test facts in the corpus (a tiny model then scores at chance)")
    parser.add_argument("--annotated", type=float, default=0.03,
                        help="share of the corpus's worked problems written in GSM8K's annotated style")
    parser.add_argument("--scale", type=float, default=3.0, help="stretch of the problems' quantities (difficulty)")
    parser.add_argument("--world", type=float, default=1.0, help="stretch of the number of entities in the world")
    parser.add_argument("--vocab", type=int, default=1024, help="tokenizer vocabulary size")
    args = parser.parse_args(argv)

    rng = random.Random(args.seed)
    world = build_world(rng, args.world)
    facts = world_facts(world, rng, args.eval_frac)

    # Target task: train and test are disjoint, and the corpus repeats neither.
    seen, split = set(), {"train": [], "test": []}
    for name, count in [("test", args.test), ("train", args.train)]:
        while len(split[name]) < count:
            q, a = problem(rng, args.scale)
            if q not in seen:
                seen.add(q)
                split[name].append({"question": q, "answer": annotate(a)})

    # Retention tasks: eval facts only; MMLU dev (few-shot exemplars) from practice facts.
    eval_facts = [f for f in facts if f["eval"]]
    practice = [f for f in facts if not f["eval"]]
    people = [f for f in eval_facts if f["kind"] == "person"]
    rng.shuffle(people)
    truthfulqa = [truthfulqa_item(f, rng) for f in people[:args.truthfulqa]]
    mmlu = {}
    for subject in [s for _, s, _ in SCHEMA.values() if s]:
        test = [f for f in eval_facts if f["subject"] == subject]
        rng.shuffle(test)
        dev = rng.sample([f for f in practice if f["subject"] == subject], 5)
        mmlu[subject] = {"test": [mmlu_row(f) for f in test], "dev": [mmlu_row(f) for f in dev]}

    # The corpus.
    facts_by_entity = {}
    for f in facts:
        facts_by_entity.setdefault(f["entity"], []).append(f)
    asked_by_subject = {}
    for f in (practice if args.mmlu_held_out else facts):
        if f["subject"]:
            asked_by_subject.setdefault(f["subject"], []).append(f)
    shares = [float(x) for x in args.mix.split(",")]
    make = [lambda: corpus_problem(rng, seen, args.scale, args.annotated),
            lambda: fact_text(world, facts_by_entity, rng),
            lambda: qa_chain(practice, rng),
            lambda: mc_block(asked_by_subject, rng),
            lambda: calculator_tape(rng)]
    corpus = [rng.choices(make, shares)[0]() for _ in tqdm(range(args.docs), desc="corpus", mininterval=2)]

    # Retention contexts no evaluation scores (drift.py's retention KLs): TruthfulQA items on eval people the test
    # does not ask about, MMLU rows on practice facts; from a stream of their own, as the validation problems.
    extra_rng = random.Random(f"{args.seed}/extra")
    extra_tqa = [truthfulqa_item(f, extra_rng) for f in people[args.truthfulqa:args.truthfulqa + args.extra]]
    extra_mmlu = {}
    for subject in mmlu:
        pool = [f for f in practice if f["subject"] == subject]
        extra_mmlu[subject] = [mmlu_row(f) for f in extra_rng.sample(pool, min(len(pool), args.extra // len(mmlu)))]

    # Validation: new problems, in neither train nor test nor the corpus.
    seen |= {t.split("\n", 1)[0].removeprefix("Question: ") for t in corpus if t.startswith("Question: ")}
    validation_rng, split["validation"] = random.Random(f"{args.seed}/validation"), []
    while len(split["validation"]) < args.validation:
        q, a = problem(validation_rng, args.scale)
        if q not in seen:
            seen.add(q)
            split["validation"].append({"question": q, "answer": annotate(a)})

    os.makedirs(args.out, exist_ok=True)
    for sub in ["gsm8k", "truthfulqa", "mmlu/dev", "mmlu/test", "mmlu/extra", "tokenizer"]:
        os.makedirs(os.path.join(args.out, sub), exist_ok=True)
    for name, rows in split.items():
        with open(os.path.join(args.out, "gsm8k", f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(args.out, "truthfulqa", "mc_task.json"), "w") as f:
        json.dump(truthfulqa, f, indent=1)
    with open(os.path.join(args.out, "truthfulqa", "extra.json"), "w") as f:
        json.dump(extra_tqa, f, indent=1)
    for subject, rows in extra_mmlu.items():
        mmlu[subject]["extra"] = rows
    for subject, splits in mmlu.items():
        for name, rows in splits.items():
            with open(os.path.join(args.out, "mmlu", name, f"{subject}_{name}.csv"), "w", newline="") as f:
                csv.writer(f, lineterminator="\n").writerows(rows)
    with open(os.path.join(args.out, "corpus.jsonl"), "w") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in corpus)
    with open(os.path.join(args.out, "world.json"), "w") as f:  # the ground truth, for readers and tests
        json.dump({k: v for k, v in world.items() if k != "pools"}, f, indent=1)

    tok = train_tokenizer(corpus + [r["question"] + r["answer"] for r in split["train"]], args.vocab)
    tok.save(os.path.join(args.out, "tokenizer", "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer", "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "add_bos_token": False, "clean_up_tokenization_spaces": False,
                   "model_max_length": 2048}, f, indent=1)
    n_tokens = sum(len(e.ids) for e in tok.encode_batch(corpus))
    print(f"wrote {args.out}: gsm8k {len(split['train'])}/{len(split['validation'])}/{len(split['test'])} "
          f"(train/validation/test), truthfulqa {len(truthfulqa)}, "
          f"mmlu {sum(len(s['test']) for s in mmlu.values())} test over {len(mmlu)} subjects, "
          f"corpus {len(corpus)} documents / {n_tokens / 1e6:.1f}M tokens, vocab {tok.get_vocab_size()}")


if __name__ == "__main__":
    main()
