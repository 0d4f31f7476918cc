"""P0 of tiny/probes/README.md: structural checks of world 2's data (no model). python tiny/probes/p0_data.py [DATA_DIR]"""
import json, re, sys
d = sys.argv[1] if len(sys.argv) > 1 else 'tiny/data'
w = json.load(open(f'{d}/world.json'))
train_people = set(w['train_people']); people = {p['name']: p for p in w['person']}
eval_people = set(people) - train_people
rows = {s: [json.loads(l) for l in open(f'{d}/gsm8k/{s}.jsonl')] for s in ('train', 'validation', 'test')}
name_rx = re.compile('|'.join(sorted(map(re.escape, people), key=len, reverse=True)))
ok = True
FACT = re.compile(r'^[A-Z]\S* \S+ (is \d+ years old|earns \$\d+ an hour|keeps \d+ hens)\.$')
for s, rs in rows.items():
    pool = train_people if s == 'train' else eval_people
    for r in rs:
        names = set(name_rx.findall(r['question']))
        recalled = [l for l in r['answer'].split('\n') if FACT.search(l)]
        # a recalled fact is a sentence "<person> is N years old." etc.; the question must not state it
        if not names or not names <= pool or not recalled or any(l in r['question'] for l in recalled):
            ok = False; print('bad', s, r); break
    print(f'{s}: {len(rs)} problems, {len({n for r in rs for n in name_rx.findall(r["question"])})} people, '
          f'all about {"train" if s == "train" else "eval"} people; every answer recalls >=1 fact: '
          f'{ok}')
qs = {s: {r['question'] for r in rs} for s, rs in rows.items()}
print('splits disjoint:', not (qs['train'] & qs['test']) and not (qs['train'] & qs['validation']) and not (qs['validation'] & qs['test']))
corpus_q = set()
for l in open(f'{d}/corpus.jsonl'):
    t = json.loads(l)['text']
    if t.startswith('Question: '):
        corpus_q.add(t[len('Question: '):].split('\nAnswer:')[0])
print('corpus holds none of them:', not (corpus_q & (qs['train'] | qs['validation'] | qs['test'])),
      f'({len(corpus_q)} corpus worked problems = {len(corpus_q) / len(rows["train"]):.1f}x the train set)')
def mask(q, names):
    q = re.sub(r'\d+', 'N', q)
    return name_rx.sub('P', q) if names else q
for names in (False, True):
    tr = {mask(q, names) for q in qs['train']}
    for s in ('validation', 'test'):
        hit = sum(mask(q, names) in tr for q in qs[s]) / len(qs[s])
        print(f'masked ({"numbers+names" if names else "numbers"}) {s} questions equal to a train question: {hit:.3f}')
