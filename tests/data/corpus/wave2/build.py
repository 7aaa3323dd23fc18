#!/usr/bin/env python3
"""Builds tests/data/corpus/wave2.jsonl from the blocks in wave2/NN.txt.

A block starts with `@ URL [vendor=V]`; each line after it is `S K [CLASS [LABEL]] | LINE` with
S the stream (k kernel log, e stderr, o stdout, t tool) and K the kind: F a fault line of CLASS
(one of CLASSES.md) with a fine LABEL, B benign, N context (not scored). Sources already in
lines.jsonl are skipped. The held-out fifth is chosen by hash of the source, not by hand.
"""
import json, re, glob, sys, pathlib
HERE = pathlib.Path(__file__).resolve().parent
existing = {json.loads(l)['source'] for l in open(HERE.parent / 'lines.jsonl')}
PREFIXES = [
    ('devkmsg_raw', re.compile(r'^\d+,\d+,\d+,[^;]*;')),
    ('dmesg_monotonic', re.compile(r'^\[\s*\d+\.\d+\]\s?')),
    ('dmesg_ctime', re.compile(r'^\[(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun) [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}\]\s?')),
    ('syslog', re.compile(r'^[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \S+ kernel: (?:\[\s*\d+\.\d+\] )?')),
    ('syslog_rfc3339', re.compile(r'^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\S* \S+ kernel: (?:\[\s*\d+\.\d+\] )?')),
    ('printk_level', re.compile(r'^<\d>')),
]
STREAMS = {'k': 'kmsg', 'e': 'stderr', 'o': 'stdout', 't': 'tool'}
rows = []; srcs = []; held = set()
for path in sorted(glob.glob(str(HERE / '[0-9]*.txt'))):
    src = None; skip = False
    for n, raw in enumerate(open(path, encoding='utf-8'), 1):
        raw = raw.rstrip('\n')
        if not raw.strip() or raw.startswith('#'):
            continue
        if raw.startswith('@ '):
            parts = raw[2:].split()
            src = parts[0]; vendor = 'any'; ho = False
            for p in parts[1:]:
                if p == 'heldout': ho = True
                elif p.startswith('vendor='): vendor = p[7:]
            if src in existing: print(f'DUP {path}:{n}: {src}'); skip=True; continue
            skip=False
            if src in srcs: sys.exit(f'{path}:{n}: source twice: {src}')
            srcs.append(src)
            if ho: held.add(src)
            continue
        if skip: continue
        head, sep, line = raw.partition(' | ')
        if not sep: sys.exit(f'{path}:{n}: no " | ": {raw}')
        f = head.split()
        stream = STREAMS[f[0]]; kind = f[1]
        line = line.rstrip()
        if kind == 'F':
            fc = f[2]; cls = f[3] if len(f) > 3 else fc
        elif kind == 'B':
            fc = 'benign'; cls = 'benign'
        elif kind == 'N':
            fc = None; cls = f[2] if len(f) > 2 else 'context'
        else:
            sys.exit(f'{path}:{n}: kind {kind}')
        form, msg = 'none', line
        for name, rx in PREFIXES:
            m = rx.match(line)
            if m:
                form, msg = name, line[m.end():]
                break
        rows.append({'line': line, 'stream': stream, 'vendor': vendor, 'class': cls,
                     'fault_class': fc, 'source': src, 'prefix_form': form, 'message': msg,
                     'origin': 'public_post', 'held_out': src in held})
# The held-out fifth is chosen blind: the sources whose SHA-1 sorts first.
import hashlib, math
ranked = sorted(srcs, key=lambda s: hashlib.sha1(s.encode()).hexdigest())
held = set(ranked[:math.ceil(len(srcs) / 5)])
for r in rows:
    r['held_out'] = r['source'] in held
with open(HERE.parent / 'wave2.jsonl', 'w') as out:
    for r in rows:
        out.write(json.dumps(r, ensure_ascii=False) + '\n')
import collections
c = collections.Counter(r['fault_class'] for r in rows)
print(f"{len(rows)} lines, {len(srcs)} sources ({len(held)} held out), benign {c['benign']} ({100*c['benign']/max(len(rows),1):.0f}%), faults {sum(v for k,v in c.items() if k not in (None,'benign'))}, context {c[None]}")
