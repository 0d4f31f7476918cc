"""Q0 of tiny/probes/README.md (world 3): structural checks of tiny/world3.py's data, no model.

    python tiny/probes/p0_world3.py [DATA_DIR]     # world 2's P0 (p0_data.py) plus world 3's kinds and retention splits
"""
import collections, csv, glob, json, os, subprocess, sys
d = sys.argv[1] if len(sys.argv) > 1 else 'tiny/probes/third/data'
subprocess.run([sys.executable, 'tiny/probes/p0_data.py', d], check=True)   # people, recall, disjoint splits, corpus
kinds = json.load(open(f'{d}/gsm8k/kinds.json'))
for split, ks in kinds.items():
    c = collections.Counter(ks)
    print(f'{split}: {len(c)} kinds, rare kinds 17-20: {[c[k] for k in range(17, 21)]} of {len(ks)} '
          f'({sum(c[k] for k in range(17, 21)) / len(ks):.3f}; 4/21 = 0.190)')
tq = {n: [i['question'] for i in json.load(open(f'{d}/truthfulqa/{n}.json'))] for n in ('mc_task', 'validation', 'extra')}
print('truthfulqa test / validation / extra:', [len(v) for v in tq.values()], 'pairwise disjoint:',
      len(set().union(*map(set, tq.values()))) == sum(map(len, tq.values())))
mm = {s: [r[0] for p in sorted(glob.glob(f'{d}/mmlu/{s}/*.csv')) for r in csv.reader(open(p, newline=''))]
      for s in ('test', 'validation', 'extra', 'dev')}
print('mmlu test / validation / extra / dev:', [len(v) for v in mm.values()], 'pairwise disjoint:',
      len(set().union(*map(set, mm.values()))) == sum(map(len, mm.values())))
asks = collections.Counter()
for line in open(f'{d}/corpus.jsonl'):
    t = json.loads(line)['text']
    if t.startswith('The following are multiple choice questions'):
        for item in t.split('\n\n')[1:]:
            asks[item.split('\nA. ')[0]] += 1
for s in ('test', 'validation'):
    n = [asks[q] for q in mm[s]]
    print(f'mmlu {s}: asked by the corpus {sum(n) / len(n):.1f} times an item (min {min(n)})')
