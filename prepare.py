"""
Prepare pretraining data: corpora in, clean token shards out, at the speed of the tokenizer.

    python prepare.py                      # the Python standard library -> data/stdlib/ (offline)
    python prepare.py --dataset=shakespeare_char --sources=input.txt --tokenizer_type=char
    python prepare.py --dataset=mix --sources=stdlib,notes/ --dataset_sampling="{'stdlib': 3, 'notes/': 1}"
    python prepare.py --write_tasks=True         # the offline task suite (SFT/DPO/RL) -> data/tasks/
    python prepare.py --validate=chat.jsonl --kind=sft   # check a chat file; writes nothing

Writes data/<dataset>/: train.bin and val.bin (token ids, every document prefixed by
<|endoftext|>), tokenizer.json, meta.json and stats.json, built in data/<dataset>.tmp/ and moved
in when the run succeeds: a failed run leaves the previous dataset as it was. The story: sources
-> cleaning -> train/val split -> tokenizer -> tokenise -> mixing -> write -> stats. Mixing comes
after tokenising because its budgets are counted in tokens. Text waits in spool files on disk
between the steps, so a corpus larger than memory works. docs/data.md has the formats.
"""

import atexit
import json
import mmap
import os
import shutil
import signal
import sys
import time

import numpy as np

import data
from configurator import configure
from tokenizer import SPECIAL_TOKENS, Tokenizer, char_tokenizer, gpt2_tokenizer, train_bpe

# ----------------------------------------------------------------------------- config
# --- what to build
dataset = 'stdlib'  # output folder: data/<dataset>/
sources = ''  # comma-separated: stdlib, tinyshakespeare, tinystories, fineweb-edu, an http(s) URL, a
            # .txt/.jsonl/.parquet file, a directory or a glob; '' = the dataset's own (see DEFAULT_SOURCE)
data_root = 'data'
val_fraction = 0.1  # of each source's documents (of a one-document source: its last 10%, as nanoGPT)
seed = 1337  # the split is by content hash; the seed drives sampling and the MinHash permutations
skip_bad_lines = False  # a bad line of a .jsonl source is an error unless this is set
# --- cleaning: each step can be switched off; what it did goes to stats.json
normalize = 'NFC'  # Unicode normal form: NFC, NFKC, or '' for none
strip_control = True  # \r\n -> \n; control characters (but \t \n) and BOMs removed
drop_boilerplate = True  # lines with cookie banners, "all rights reserved", lorem ipsum, placeholders
min_chars = 32  # shorter documents are dropped (empty __init__.py files and the like)
max_chars = 0  # longer documents are dropped; 0 = no limit
exact_dedup = True
near_dedup = True  # MinHash over word 5-grams
near_dedup_threshold = 0.8  # estimated Jaccard similarity at which a document counts as a near-duplicate
# --- mixing
dataset_sampling = {}  # {source: weight} or {source: {'weight' or 'target_tokens', 'max_samples'}}; see docs/data.md
# --- tokenizer
tokenizer_type = 'bpe'  # bpe (trained here), char, gpt2, or the path of a tokenizer.json to reuse
vocab_size = 4096  # bpe only: tiny CPU models want a small vocabulary
tokenizer_train_chars = 10_000_000  # bpe trains on this much of the train split (~1 s per 10M on a CPU)
num_threads = 0  # tokenising threads; 0 = every core
chunk_mb = 16.0  # text tokenised and written per step: bounds memory, whatever the corpus size
# --- other modes (each does its job and exits)
write_tasks = False  # write the offline task suite to data/tasks/
assistant_name = 'Mini'  # the identity the task suite teaches
assistant_maker = 'the Mini-LLM project'
validate = ''  # a chat JSONL to check with --kind=sft|pref|rl
kind = 'sft'
config = configure(globals())  # overrides from config files and --key=value arguments

DEFAULT_SOURCE = {'stdlib': 'stdlib', 'shakespeare_char': 'tinyshakespeare', 'shakespeare': 'tinyshakespeare',
                  'tinyshakespeare': 'tinyshakespeare', 'tinystories': 'tinystories', 'fineweb_edu': 'fineweb-edu',
                  'fineweb-edu': 'fineweb-edu'}


# ----------------------------------------------------------------------------- other modes
if validate:
    if kind not in data.PARSERS:
        raise SystemExit(f"--kind={kind!r}: use sft, pref or rl")
    tok_path = os.path.join(data_root, dataset, 'tokenizer.json')
    tok = Tokenizer.load(tok_path) if os.path.exists(tok_path) else None
    counts, errors = data.validate_file(validate, kind, tok)
    for error in errors:
        print(error)
    tokens = (f"{counts['tokens']:,} tokens ({tok_path})" if tok else
              f"tokens not counted: no {tok_path} (run prepare.py first)")
    extra = f", {counts['with_answer']:,} with answers" if 'with_answer' in counts else ''
    print(f"{validate}: {counts['records']:,} good {kind} records, {counts['turns']:,} turns{extra}, {tokens}; "
          f"{len(errors)} bad line(s)")
    sys.exit(1 if errors else 0)
if write_tasks:
    import tasks as task_suite
    out = os.path.join(data_root, 'tasks')
    counts = task_suite.write_tasks(out, seed=seed, name=assistant_name, maker=assistant_maker)
    print(f"wrote {out}/: " + ', '.join(f"{name} {n:,}" for name, n in counts.items()))
    sys.exit(0)

t_start = time.time()
out_dir = os.path.join(data_root, dataset)
# Everything is built in a folder beside out_dir and moved in only when the run succeeds, so a typo,
# a crash or Ctrl-C leaves the previous dataset whole and usable. (A leftover from a killed run is
# cleared here; atexit clears this run's on any exit Python sees: errors, Ctrl-C.)
tmp_dir = os.path.normpath(out_dir) + '.tmp'
shutil.rmtree(tmp_dir, ignore_errors=True)
os.makedirs(tmp_dir)
atexit.register(shutil.rmtree, tmp_dir, ignore_errors=True)
OUTPUTS = ('train.bin', 'val.bin', 'tokenizer.json', 'stats.json', 'meta.json')  # meta.json last: it marks completion

# ----------------------------------------------------------------------------- sources
specs = [s.strip() for s in sources.split(',') if s.strip()] or list(dataset_sampling) or [DEFAULT_SOURCE.get(dataset)]
if specs == [None]:
    raise SystemExit(f"dataset {dataset!r} has no built-in source: pass --sources=PATH (a .txt/.jsonl file, a "
                     f"directory or a glob), or use one of {', '.join(DEFAULT_SOURCE)}")
twice = next((s for i, s in enumerate(specs) if s in specs[:i]), None)
if twice is not None:  # dedup would empty the second copy, and results are kept per source name
    raise SystemExit(f"--sources gives {twice!r} twice: a source is read once; to repeat it, use "
                     f"--dataset_sampling=\"{{'{twice}': {{'target_tokens': N}}}}\"")
if tokenizer_type == 'bpe' and vocab_size < 256 + len(SPECIAL_TOKENS):  # checked before the slow steps
    raise SystemExit(f"--vocab_size={vocab_size} is too small for a byte-level BPE: it needs at least "
                     f"{256 + len(SPECIAL_TOKENS)} (256 bytes + {len(SPECIAL_TOKENS)} special tokens); "
                     f"the default is 4096")
rules = data.parse_sampling(dataset_sampling, specs)
sources = [(spec,) + data.resolve_source(spec, os.path.join(data_root, 'downloads')) for spec in specs]
for spec, where, files in sources:
    print(f"source {spec}: {where} ({len(files):,} file{'s' if len(files) != 1 else ''})")

# ----------------------------------------------------------------------------- cleaning
# Each document goes through the cleaning steps, is checked against everything kept so far (across
# sources), and is appended to a text spool. Memory holds per-document hashes, never the corpus.
t0 = time.time()
cleaner = data.Cleaner(normalize, strip_control, drop_boilerplate, min_chars, max_chars, exact_dedup, near_dedup,
                       near_dedup_threshold, seed)
stats = {}
doc_source, doc_key, offsets = [], [], [0]  # per kept document; offsets are byte offsets into the spool
with open(os.path.join(tmp_dir, 'text.bin'), 'wb') as spool:
    def add_document(text, key, source_id):
        raw = text.encode('utf-8')
        spool.write(raw)
        offsets.append(offsets[-1] + len(raw))
        doc_source.append(source_id)
        doc_key.append(key)

    for source_id, (spec, where, files) in enumerate(sources):
        st = stats[spec] = dict(source=where, files=len(files), **data.Cleaner.new_counts())
        n_before, text = len(doc_key), None
        try:
            for text, key in cleaner.run(data.iter_documents(files, skip_bad_lines, st), st):
                add_document(text, key, source_id)
        except data.DataError as e:  # a bad line or an unreadable file: the message names file, line and field
            raise SystemExit(str(e)) from None
        if len(doc_key) - n_before == 1 and val_fraction > 0:
            # one document (a single text like Shakespeare): split it by position, nanoGPT style
            spool.seek(offsets[-2])
            spool.truncate()
            del offsets[-1], doc_source[-1], doc_key[-1]
            cut = int(len(text) * (1 - val_fraction))
            add_document(text[:cut], 0, source_id)
            add_document(text[cut:], 2 ** 64 - 1, source_id)  # the largest key: it goes to val below
        dropped = ', '.join(f"{k} {v:,}" for k, v in st['dropped'].items() if v) or 'none dropped'
        print(f"clean {spec}: {st['docs_in']:,} docs in, {st['docs_out']:,} out ({dropped}); "
              f"{st['boilerplate_lines']:,} boilerplate lines, {st['control_chars']:,} control chars removed; "
              f"{st['bad_lines']:,} bad lines dropped; {st['chars_out'] / 1e6:.1f}M chars")
        if st['docs_out'] == 0:
            print(f"note: nothing of {spec} is left after cleaning: it adds no documents")
t_clean = time.time() - t0
doc_source, doc_key, offsets = np.array(doc_source, np.int64), np.array(doc_key, np.uint64), np.array(offsets, np.int64)
n_docs = len(doc_key)
if n_docs == 0 or offsets[-1] == 0:
    raise SystemExit("no text left after cleaning: check --sources, or loosen min_chars / max_chars")

# ----------------------------------------------------------------------------- train/val split
# Per source, the val_fraction of documents with the largest content hashes go to val: a fixed
# pick that needs no file order and no random state. max_samples then caps the train documents.
is_val = np.zeros(n_docs, bool)
use = np.ones(n_docs, bool)  # documents to tokenise: val, and train within max_samples
rng = np.random.default_rng(seed)
for source_id, (spec, _, _) in enumerate(sources):
    ids = np.flatnonzero(doc_source == source_id)
    n_val = max(0, min(len(ids) - 1, max(1, round(val_fraction * len(ids))))) if val_fraction > 0 else 0
    is_val[ids[np.argsort(doc_key[ids], kind='stable')[len(ids) - n_val:]]] = True
    train_ids = ids[~is_val[ids]]
    cap = rules[spec].get('max_samples')
    if cap is not None and cap < len(train_ids):
        use[np.setdiff1d(train_ids, rng.choice(train_ids, int(cap), replace=False))] = False
    stats[spec].update(train_docs=int(use[train_ids].sum()), val_docs=int(n_val))
if not is_val.any():
    raise SystemExit("the val split is empty: set --val_fraction > 0, and give a source at least two documents "
                     "(or one, which is then split by position)")

spool_file = open(os.path.join(tmp_dir, 'text.bin'), 'rb')
text_mm = mmap.mmap(spool_file.fileno(), 0, access=mmap.ACCESS_READ)


def document(i):
    return text_mm[offsets[i]:offsets[i + 1]].decode('utf-8')


# ----------------------------------------------------------------------------- tokenizer
t0 = time.time()
if tokenizer_type == 'bpe':
    # train documents in content-hash order: a spread over every source, not just the first files
    sample, n_chars = [], 0
    for i in np.argsort(doc_key, kind='stable'):
        if n_chars >= tokenizer_train_chars:
            break
        if use[i] and not is_val[i]:
            sample.append(document(i)[:tokenizer_train_chars - n_chars])
            n_chars += len(sample[-1])
    tok = train_bpe(sample, vocab_size)
    del sample
elif tokenizer_type == 'char':
    chars = set()  # every character of train and val, as nanoGPT (a val character must have an id)
    for start in range(0, n_docs, 1000):
        chars.update(text_mm[offsets[start]:offsets[min(n_docs, start + 1000)]].decode('utf-8'))
    tok = char_tokenizer(''.join(sorted(chars)))
elif tokenizer_type == 'gpt2':
    try:
        tok = gpt2_tokenizer()
    except RuntimeError as e:  # offline without tiktoken's cache: its message says what to do
        raise SystemExit(str(e)) from None
elif tokenizer_type.endswith('.json') and os.path.isfile(tokenizer_type):
    tok = Tokenizer.load(tokenizer_type)
else:
    raise SystemExit(f"tokenizer_type={tokenizer_type!r}: use bpe, char, gpt2, or the path of an existing tokenizer.json")
dtype = data.token_dtype(tok.n_vocab)
t_tokenizer = time.time() - t0
print(f"tokenizer: {tok.identity} ({tok.n_vocab:,} ids -> {np.dtype(dtype).name}) in {t_tokenizer:.1f}s")

# ----------------------------------------------------------------------------- tokenise
# Documents are read back from the spool chunk_mb at a time, encoded on num_threads threads, each
# prefixed by <|endoftext|>, and appended to a token spool (data.tokenise_spool; bench/bench_tokenize.py
# times this same call against raw tiktoken). One progress line per second.
t0 = time.time()
todo = np.flatnonzero(use)
doc_tokens = np.zeros(n_docs, np.int64)
doc_tokens[todo] = data.tokenise_spool(tok, text_mm, offsets, todo, os.path.join(tmp_dir, 'tokens.bin'), dtype,
                                       num_threads, chunk_mb * 1e6)
t_tokenise = time.time() - t0
doc_bytes = np.diff(offsets)
total_bytes = int(doc_bytes[todo].sum())
token_offsets = np.concatenate(([0], np.cumsum(doc_tokens)))

# ----------------------------------------------------------------------------- mixing
train_ids = {spec: np.flatnonzero((doc_source == sid) & use & ~is_val) for sid, (spec, _, _) in enumerate(sources)}
chosen = data.mix_documents({spec: doc_tokens[ids] for spec, ids in train_ids.items()}, rules, seed)

# ----------------------------------------------------------------------------- write
# Spans of the token spool are copied into train.bin and val.bin in tmp_dir; they, the tokenizer,
# stats.json and meta.json move into out_dir at the end, when everything has worked.
t0 = time.time()
tokens = np.memmap(os.path.join(tmp_dir, 'tokens.bin'), dtype, 'r')
with open(os.path.join(tmp_dir, 'train.bin'), 'wb') as f:
    for spec, ids in train_ids.items():
        picked = ids[chosen[spec]]
        stats[spec].update(train_tokens=data.copy_documents(tokens, token_offsets, picked, f),
                           train_docs_written=len(picked), unique_train_docs=len(np.unique(picked)))
val_ids = np.flatnonzero(is_val)
with open(os.path.join(tmp_dir, 'val.bin'), 'wb') as f:
    data.copy_documents(tokens, token_offsets, val_ids, f)
for sid, (spec, _, _) in enumerate(sources):
    ids = val_ids[doc_source[val_ids] == sid]
    stats[spec].update(val_tokens=int(doc_tokens[ids].sum()), val_bytes=int(doc_bytes[ids].sum()))
del tokens
text_mm.close()
spool_file.close()
train_tokens = sum(s['train_tokens'] for s in stats.values())
val_tokens = sum(s['val_tokens'] for s in stats.values())
if train_tokens == 0:
    raise SystemExit("train split is empty: every document went to val or was sampled away; check dataset_sampling")
tok.save(os.path.join(tmp_dir, 'tokenizer.json'))
for spool in ('text.bin', 'tokens.bin'):
    os.remove(os.path.join(tmp_dir, spool))
t_write = time.time() - t0

# ----------------------------------------------------------------------------- stats
tokenise_mb_s = total_bytes / 1e6 / max(t_tokenise, 1e-9)
totals = {k: sum(s[k] for s in stats.values()) for k in ('docs_in', 'docs_out', 'chars_in', 'chars_out', 'train_docs',
                                                        'val_docs', 'train_tokens', 'val_tokens', 'val_bytes')}
totals['dropped'] = {r: sum(s['dropped'][r] for s in stats.values()) for r in data.DROP_REASONS}
timing = {'clean_s': round(t_clean, 2), 'tokenizer_s': round(t_tokenizer, 2), 'tokenise_s': round(t_tokenise, 2),
          'tokenise_mb_per_s': round(tokenise_mb_s, 1), 'write_s': round(t_write, 2),
          'total_s': round(time.time() - t_start, 2)}
with open(os.path.join(tmp_dir, 'stats.json'), 'w') as f:
    json.dump({'dataset': dataset, 'total': totals, 'sources': stats, 'timing': timing, 'config': config}, f, indent=1)
meta = {'dataset': dataset, 'tokenizer': 'tokenizer.json', 'tokenizer_kind': tok.kind,
        'tokenizer_identity': tok.identity, 'vocab_size': tok.n_vocab, 'dtype': np.dtype(dtype).name,
        'train_tokens': train_tokens, 'val_tokens': val_tokens, 'val_bytes': totals['val_bytes'],
        'bos_id': tok.eot_id, 'sources': {spec: s['source'] for spec, s in stats.items()},
        'documents': {'train': totals['train_docs'], 'val': totals['val_docs']}, 'seed': seed}
with open(os.path.join(tmp_dir, 'meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)

# ----------------------------------------------------------------------------- swap in
# Renames only: meta.json goes first (the folder reads as incomplete while the shards change) and
# comes back last. Ctrl-C and SIGTERM wait until the renames are done; only kill -9 in these few
# microseconds could leave the folder without meta.json, i.e. visibly incomplete, never mixed.
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
os.makedirs(out_dir, exist_ok=True)
if os.path.exists(os.path.join(out_dir, 'meta.json')):
    os.remove(os.path.join(out_dir, 'meta.json'))
for name in OUTPUTS:
    os.replace(os.path.join(tmp_dir, name), os.path.join(out_dir, name))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
os.rmdir(tmp_dir)
for spec, s in stats.items():
    share = s['train_tokens'] / max(1, train_tokens)
    print(f"{spec}: train {s['train_tokens']:,} tokens ({share:.1%} of the mix, {s['train_docs_written']:,} docs), "
          f"val {s['val_tokens']:,} tokens ({s['val_docs']:,} docs)")
print(f"wrote {out_dir}/: train.bin {train_tokens:,} tokens, val.bin {val_tokens:,} tokens ({np.dtype(dtype).name}); "
      f"clean {t_clean:.1f}s, tokenizer {t_tokenizer:.1f}s, tokenise {t_tokenise:.1f}s ({tokenise_mb_s:.1f} MB/s), "
      f"total {timing['total_s']:.1f}s")
