"""Probes P1-P5 of tiny/probes/README.md on a world-2 model (the base, or a LoRA checkpoint merged into it).
Adapted from ../shared/probes/probe_tiny.py (world 1). One core, a minute or two.

    OMP_NUM_THREADS=1 python tiny/probes/probe2.py --out tiny/probes/base.json
    OMP_NUM_THREADS=1 python tiny/probes/probe2.py --checkpoint ckpt/w2_stress.pt --out tiny/probes/stress.json

P1 greedy accuracy on gsm8k/validation.jsonl (evaluate.py's protocol); P3 where each wrong validation answer
first leaves the gold solution (annotations removed from both): at a recalled fact's value (recall), at a step's
result with the right operands (arithmetic), or elsewhere (plan: another operand, operation, person or
structure); P2 teacher-forced step results on 600 train gold solutions, plain vs inside the annotation; P4
recall of numeric facts in their canonical context (argmax over the value pool) for eval and train people, and
of the held-out categorical facts of the TruthfulQA items; P5 TruthfulQA MC1/MC2 and MMLU on all items."""
import argparse, contextlib, json, random, re, sys, time
sys.path.insert(0, '.')
import torch
import lora
from model import load_model
from evaluate import eval_gsm8k, eval_mmlu, eval_truthfulqa, load_gsm8k, load_mmlu, load_truthfulqa, loglikelihoods
from tiny.world import AGES, HENS, JOBS, PETS, WAGES

p = argparse.ArgumentParser()
p.add_argument('--model', default='tiny/model'); p.add_argument('--data-dir', default='tiny/data')
p.add_argument('--checkpoint'); p.add_argument('--out'); p.add_argument('--split', default='validation')
p.add_argument('--threads', type=int, default=1)
p.add_argument('--limit', type=int, default=0, help='smoke test: first N items of each part')
args = p.parse_args(); torch.set_num_threads(args.threads)
D = args.data_dir
model, tok = load_model(args.model); model.eval()
if args.checkpoint:
    lora.load_adapter(model, args.checkpoint)
ctx = lora.merged(model) if args.checkpoint else contextlib.nullcontext()
deann = lambda a: re.sub(r'<<[^>]*>>', '', a)
STEP = re.compile(r'(\d+) ([-+*/]) (\d+) = \$?(\d+)')
FACT = re.compile(r'^(.+?) (is |earns \$|keeps )(\d+)( years old| an hour| hens)\.$')
out = {'model': args.model, 'checkpoint': args.checkpoint}
with ctx, torch.no_grad():
    t0 = time.time()
    val = load_gsm8k(args.split, D)[:args.limit or None]
    res, recs = eval_gsm8k(model, tok, val, batch_size=128, progress=False)
    kinds = {'recall': 0, 'arithmetic': 0, 'plan': 0, 'after the steps': 0}
    examples = {}
    for ex, r in zip(val, recs):
        if r['correct']:
            continue
        gold = deann(ex['answer']).split('\n')[:-1]
        comp = deann(r['completion']).strip().split('\n')
        kind = 'after the steps'
        for i, g in enumerate(gold):
            c = comp[i].strip() if i < len(comp) else ''
            if c == g:
                continue
            fg, fc = FACT.match(g), FACT.match(c)
            sg, sc = STEP.search(g), STEP.search(c)
            if fg:
                kind = 'recall' if fc and fc[1] == fg[1] and fc[2] == fg[2] and fc[3] != fg[3] else 'plan'
            elif sg and sc and sg.groups()[:3] == sc.groups()[:3] and sg[4] != sc[4]:
                kind = 'arithmetic'
            else:
                kind = 'plan'
            break
        kinds[kind] += 1
        examples.setdefault(kind, []).append({'question': ex['question'], 'gold': ex['answer'], 'completion': r['completion']})
    wrong = sum(kinds.values())
    out['P1_target'] = {'split': args.split, 'n': len(val), 'accuracy': res['score'],
                        'annotated_completions': sum('<<' in r['completion'] for r in recs)}
    out['P3_errors'] = {'wrong': wrong, **kinds, **{f'{k}_share': round(v / max(wrong, 1), 3) for k, v in kinds.items()},
                        'examples': {k: v[:3] for k, v in examples.items()}}
    print(f"P1 {args.split} accuracy {res['score']:.3f} (n={len(val)}); annotated completions "
          f"{out['P1_target']['annotated_completions']}")
    print(f"P3 wrong answers {wrong}: " + ', '.join(f'{k} {v} ({v / max(wrong, 1):.2f})' for k, v in kinds.items()))

    rows = [json.loads(l) for l in open(f'{D}/gsm8k/train.jsonl')]
    random.Random(0).shuffle(rows)
    ANN = re.compile(r'(\d+) [-+*/] (\d+) = \$?<<\d+ [-+*/] \d+ = (\d+)>>(\d+)')
    PLN = re.compile(r'(\d+) [-+*/] (\d+) = \$?(\d+)')
    stats = {}
    for r in rows[:args.limit or 600]:
        for style in ('plain', 'annotated'):
            text = f"Question: {r['question']}\nAnswer: " + (r['answer'] if style == 'annotated' else deann(r['answer']))
            enc = tok.tok.encode(text, add_special_tokens=False)
            pred = model(torch.tensor([enc.ids]))[0].argmax(-1)
            for m in (ANN if style == 'annotated' else PLN).finditer(text):
                a, b = m.start(3), m.end(3)
                toks = [i for i, (s, e) in enumerate(enc.offsets) if s < b and e > a]
                st = stats.setdefault(style, [0, 0]); st[0] += all(int(pred[i - 1]) == enc.ids[i] for i in toks); st[1] += 1
    out['P2_teacher_forced_arithmetic'] = {k: {'correct': v[0] / v[1], 'n': v[1]} for k, v in stats.items()}
    print('P2 teacher-forced step results correct: ' + ', '.join(f'{k} {v[0] / v[1]:.3f} (n={v[1]})' for k, v in stats.items()))

    w = json.load(open(f'{D}/world.json'))
    train_people = set(w['train_people'])
    people = {q['name']: q for q in w['person']}
    rng = random.Random(0)
    groups = {'eval': rng.sample([n for n in people if n not in train_people], 200),
              'train': rng.sample(sorted(train_people), 200)}
    recall = {}
    for attr, stem, cont, pool in [('age', '{e} is', ' {v} years old.', AGES), ('wage', '{e} earns $', '{v} an hour.', WAGES),
                                   ('hens', '{e} keeps', ' {v} hens.', HENS)]:
        for g, names in groups.items():
            lls = loglikelihoods(model, tok, [(stem.format(e=e), [cont.format(v=v) for v in pool]) for e in names], batch_size=256)
            recall[f'{g}_{attr}'] = sum(pool[max(range(len(pool)), key=lambda i: ll[i])] == people[e][attr]
                                        for e, ll in zip(names, lls)) / len(names)
    towns = [t['name'] for t in w['town']]
    items = json.load(open(f'{D}/truthfulqa/mc_task.json'))
    for attr, rx, stem, pool in [('pet', r'What pet does (.+) have\?', '{e} has a pet', PETS),
                                 ('job', r'What does (.+) do for a living\?', '{e} works as a', JOBS),
                                 ('home', r'Where does (.+) live\?', '{e} lives in', towns)]:
        ents = [m[1] for it in items if (m := re.match(rx, it['question']))][:150]
        lls = loglikelihoods(model, tok, [(stem.format(e=e), [' ' + v for v in pool]) for e in ents], batch_size=256)
        recall[f'heldout_{attr}'] = sum(pool[max(range(len(pool)), key=lambda i: ll[i])] == people[e][attr]
                                        for e, ll in zip(ents, lls)) / len(ents)
    out['P4_recall'] = recall
    print('P4 recall: ' + ', '.join(f'{k} {v:.3f}' for k, v in recall.items()))

    tq, _ = eval_truthfulqa(model, tok, load_truthfulqa(D)[:args.limit or None], progress=False)
    mm, _ = eval_mmlu(model, tok, load_mmlu('test', D)[:args.limit or None], progress=False)
    out['P5_retention'] = {'truthfulqa_mc1': tq['mc1'], 'truthfulqa_mc2': tq['mc2'], 'mmlu': mm['score']}
    print(f"P5 truthfulqa mc1 {tq['mc1']:.3f} mc2 {tq['mc2']:.3f}, mmlu {mm['score']:.3f}   [{time.time() - t0:.0f}s]")
    out['seconds'] = round(time.time() - t0)
if args.out:
    json.dump(out, open(args.out, 'w'), indent=1)
