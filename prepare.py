"""
Prepare pretraining data: corpora in, clean token shards out, at the speed of the tokenizer.

    python prepare.py                      # the Python standard library -> data/stdlib/ (offline)
    python prepare.py --dataset=shakespeare_char --sources=input.txt --tokenizer_type=char
    python prepare.py --dataset=mix --sources=stdlib,notes/ --dataset_sampling="{'stdlib': 3, 'notes/': 1}"
    python prepare.py --write_tasks=True         # the offline task suite (SFT/DPO/RL) -> data/tasks/
    python prepare.py --validate=chat.jsonl --kind=sft   # check a chat file; writes nothing

Writes data/<dataset>/: token shards train_000000.bin, ..., val_000000.bin, ... (token ids, every
document prefixed by <|endoftext|>), tokenizer.json, stats.json and meta.json, which lists the
shards. The story: sources -> cleaning -> train/val split -> tokenizer -> tokenise -> mixing ->
write -> stats. Mixing comes after tokenising because its budgets are counted in tokens.

At real scale: the corpus streams through every step in pieces (text waits in spool files on
disk between steps), so memory is bounded by chunk_mb and piece_mb, not by the corpus or its
largest document; cleaning and tokenising run on num_proc worker processes, with the output of
one; and everything is built in data/<dataset>.tmp/ with progress checkpoints, so a run that is
killed (Ctrl-C, kill -9, a crash) continues where it stopped when run again with the same
settings, and a run that fails leaves the previous dataset as it was. docs/data.md has the formats.
"""

import atexit
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import sys
import time

import numpy as np

import corpus
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
# --- scale: none of these changes the output but piece_mb and shard_tokens
num_proc = 0  # worker processes for cleaning and tokenising; 0 = one per core, 1 = none (same output)
chunk_mb = 16.0  # text in flight between the reader, the workers and the writer: bounds memory
piece_mb = 1.0  # a document longer than this goes through cleaning and tokenising in pieces of about
                # this many million characters, cut at line ends (tokens may differ at a cut)
shard_tokens = 100_000_000  # tokens per output shard (the last one of a split holds the rest)
checkpoint_s = 30.0  # seconds between progress checkpoints; a killed run resumes from the last
# --- other modes (each does its job and exits)
write_tasks = False  # write the offline task suite to data/tasks/
assistant_name = 'Mini'  # the identity the task suite teaches
assistant_maker = 'the Mini-LLM project'
validate = ''  # a chat JSONL to check with --kind=sft|pref|rl
kind = 'sft'
config = configure(globals())  # overrides from config files and --key=value arguments
# Ctrl-C interrupts, whatever the parent process left us: a blocked or ignored SIGINT is inherited
# (a background job of a shell script ignores it; a test runner's thread may block it), and a
# download would then hang for its whole timeout
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
signal.signal(signal.SIGINT, signal.default_int_handler)

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
if shard_tokens < 1:
    raise SystemExit(f"--shard_tokens={shard_tokens}: a shard needs at least one token (the default is 100_000_000)")
rules = corpus.parse_sampling(dataset_sampling, specs)
sources = [(spec,) + corpus.resolve_source(spec, os.path.join(data_root, 'downloads')) for spec in specs]
for spec, where, files in sources:
    print(f"source {spec}: {where} ({len(files):,} file{'s' if len(files) != 1 else ''})")

# ----------------------------------------------------------------------------- resume or start
# Everything is built in a folder beside out_dir and moved in only when the run succeeds, so a
# typo or a crash leaves the previous dataset whole. progress.json there records how far a run
# got; a run with the same settings and the same input files (size and time) continues from it.
# A run that fails is cleared; one interrupted (Ctrl-C, kill) keeps its folder to continue.
tmp_dir = os.path.normpath(out_dir) + '.tmp'
progress_path = os.path.join(tmp_dir, 'progress.json')
NOT_OUTPUT = ('num_proc', 'chunk_mb', 'checkpoint_s', 'data_root')  # settings that change no output byte
fingerprint = {'config': {k: v for k, v in config.items() if k not in NOT_OUTPUT},
               'files': [[f, os.path.getsize(f), os.stat(f).st_mtime_ns] for _, _, files in sources for f in files]}
if tokenizer_type.endswith('.json') and os.path.isfile(tokenizer_type):
    fingerprint['tokenizer'] = [os.path.getsize(tokenizer_type), os.stat(tokenizer_type).st_mtime_ns]
progress, resumed_from = {}, None
if os.path.exists(progress_path):
    with open(progress_path) as f:
        progress = json.load(f)
    if progress.get('fingerprint') == json.loads(json.dumps(fingerprint)):
        resumed_from = progress['phase']
        print(f"resuming the run in {tmp_dir} from its {resumed_from} step")
    else:
        print(f"{tmp_dir} holds an unfinished run with other settings or inputs: starting again")
        progress = {}
if not progress:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    progress = {'fingerprint': fingerprint, 'phase': 'clean', 'seconds': {}}
interrupted = False


def on_interrupt(signum, frame):
    global interrupted
    interrupted = True
    raise KeyboardInterrupt


def clean_up():  # at exit, however the run ends (errors and Ctrl-C included; kill -9 skips it)
    if pool is not None:
        pool.terminate()
    if interrupted and os.path.exists(progress_path):
        print(f"interrupted: {tmp_dir} keeps the work done; run the same command again to continue", file=sys.stderr)
    elif os.path.isdir(tmp_dir):
        shutil.rmtree(tmp_dir, ignore_errors=True)


pool = None
atexit.register(clean_up)
signal.signal(signal.SIGINT, on_interrupt)
pool = corpus.make_pool(num_proc)  # forked now, while this process is small
# text per worker task: a 16th of chunk_mb, at most 1 MB (MinHash needs ~75 bytes of memory per character)
task_bytes = int(min(1 << 20, max(1 << 12, chunk_mb * 1e6 / 16)))
in_flight = max(2 * (num_proc or os.cpu_count() or 1), int(chunk_mb * 1e6) // task_bytes)


def tmp(name):
    return os.path.join(tmp_dir, name)


def checkpoint(phase, **state):
    """Record progress: the files it counts on must be flushed to the OS first (a kill -9 then
    loses nothing of them; a power cut could). Written to a temp file and renamed: atomic."""
    progress.update(state, phase=phase)
    with open(progress_path + '.tmp', 'w') as f:
        json.dump(progress, f)
    os.replace(progress_path + '.tmp', progress_path)


def open_appending(name, size):
    """name opened to append after its first `size` bytes (what the last checkpoint counted)."""
    with open(tmp(name), 'ab') as f:
        f.truncate(size)
    return open(tmp(name), 'ab')


PIECE = np.dtype([('end', '<i8'), ('doc', '<i8')])  # per piece of kept text: its end in the spool, its document
DOC = np.dtype([('key', '<u8'), ('source', '<i8')])  # per kept document: content hash, source number

# ----------------------------------------------------------------------------- cleaning
# The reader (this process) cuts the sources into tasks of ~1 MB of pieces of documents; workers
# clean them and hash them (corpus.clean_task); this process takes the results in order, checks
# each document against everything kept so far (corpus.Cleaner: length, exact and near-duplicates,
# across sources) and appends what it keeps to a text spool (a document's pieces are written as
# they come; a dropped one is overwritten). Memory holds per-document hashes (~0.5 KB a kept
# document), never the corpus. A checkpoint records the position in the sources, the sizes of
# the spool and of the dedup journals, and the counts so far.
t0 = time.time()
cleaner = corpus.Cleaner(normalize, strip_control, drop_boilerplate, min_chars, max_chars, exact_dedup, near_dedup,
                       near_dedup_threshold, seed)
piece_chars = int(piece_mb * 1e6)
stats = progress.get('stats', {})


def clean_tasks(files, first_file, first_piece):
    """(settings, texts, tag) tasks for corpus.clean_task, ~task_bytes of pieces each, tagged with
    where each piece comes from (file, piece, whether it ends its document) and with the files
    that end in the task (file, bad lines dropped). A resumed source skips what was done."""
    texts, where, ended, size = [], [], [], 0
    for f in range(first_file, len(files)):
        bad = []
        for k, (text, ends) in enumerate(corpus.file_pieces(files[f], skip_bad_lines, bad, piece_chars)):
            if f == first_file and k < first_piece:
                continue  # cleaned before the interruption: read again, not cleaned again
            texts.append(text)
            where.append((f, k, ends))
            size += len(text)
            if size >= task_bytes:
                yield cleaner.settings, texts, (where, ended)
                texts, where, ended, size = [], [], [], 0
        ended.append((f, len(bad)))
    yield cleaner.settings, texts, (where, ended)


def whole_document(doc):
    """(stats row, exact key, MinHash args) of a document from those of its pieces."""
    if len(doc['keys']) == 1:
        return doc['rows'], doc['keys'][0], doc['minhash'][0] if doc['minhash'] else ()
    rows = doc['rows']
    rows[2] = min(1, rows[2])  # 'normalized' counts documents
    key = int.from_bytes(hashlib.blake2b(np.array(doc['keys'], np.uint64).tobytes(), digest_size=8).digest(), 'little')
    if not doc['minhash']:
        return rows, key, ()
    sig = np.min([m[0] for m in doc['minhash']], axis=0)  # the minimum over all shingles: over the pieces'
    return rows, key, (sig, any(m[1] for m in doc['minhash']), corpus.band_keys(sig[None], cleaner.near.rows)[0])


def finish_document(doc, st, source_id):
    """Keep (its pieces stay in the spool, a row each in pieces.bin, one in docs.bin) or drop it."""
    rows, key, minhash = whole_document(doc)
    corpus.add_counts(st, rows)
    reason = cleaner.admit(int(rows[1]), key, *minhash)
    if reason:
        st['dropped'][reason] += 1
        spool.seek(doc['start'])  # the next document overwrites it
        return
    st['docs_out'] += 1
    st['chars_out'] += int(rows[1])
    pieces = np.zeros(len(doc['ends']), PIECE)
    pieces['end'], pieces['doc'] = doc['ends'], doc_file.tell() // DOC.itemsize
    piece_file.write(pieces.tobytes())
    doc_file.write(np.array([(key, source_id)], DOC).tobytes())
    last_kept.update(doc=pieces['doc'][0], start=doc['start'], ends=doc['ends'])


def position_split(start, ends, chars):
    """The spool offset where the last val_fraction of a kept document's characters begins (its
    pieces end at `ends`): nanoGPT's split of a one-document source (Shakespeare)."""
    spool.flush()
    cut, counted = int(chars * (1 - val_fraction)), 0
    for a, b in zip([start] + ends[:-1], ends):
        text = os.pread(spool.fileno(), b - a, a).decode('utf-8')
        if counted + len(text) >= cut:
            return a + len(text[:cut - counted].encode('utf-8'))
        counted += len(text)
    return ends[-1]


if progress['phase'] == 'clean':
    at = progress.get('clean', {'source': 0, 'file': 0, 'piece': 0, 'sizes': {}, 'splits': []})
    splits = at['splits']  # [document, spool offset] of one-document sources, split by position
    journals = ('pieces.bin', 'docs.bin', 'seen.bin', 'sigs.bin')
    piece_file, doc_file, seen_file, sigs_file = (open_appending(n, at['sizes'].get(n, 0)) for n in journals)
    with open(tmp('text.bin'), 'ab'):
        pass
    spool = open(tmp('text.bin'), 'r+b', buffering=1 << 20)
    spool.seek(at['sizes'].get('text.bin', 0))
    cleaner.restore(np.fromfile(tmp('seen.bin'), np.uint64), np.fromfile(tmp('sigs.bin'), np.uint32).reshape(-1, 64))
    cleaner.journal = seen_file
    if cleaner.near is not None:
        cleaner.near.journal = sigs_file
    last_kept, last_checkpoint, t_log, read_bytes = {}, time.time(), time.time(), 0

    def save_clean(source, file, piece):
        for f in (piece_file, doc_file, seen_file, sigs_file, spool):
            f.flush()
        sizes = {n: f.tell() for n, f in zip(journals + ('text.bin',), (piece_file, doc_file, seen_file, sigs_file, spool))}
        checkpoint('clean', stats=stats, clean={'source': source, 'file': file, 'piece': piece, 'sizes': sizes,
                                                'splits': splits})

    for source_id in range(at['source'], len(sources)):
        spec, where_from, files = sources[source_id]
        st = stats.setdefault(spec, dict(source=where_from, files=len(files), **corpus.Cleaner.new_counts()))
        first = (at['file'], at['piece']) if source_id == at['source'] else (0, 0)
        doc = None  # the document being put together from its pieces
        try:
            for tag, raw, rows, keys, sigs, has_words, bands in corpus.ordered_map(
                    pool, corpus.clean_task, clean_tasks(files, *first), in_flight):
                where, ended = tag
                for i, (_, _, ends) in enumerate(where):
                    if doc is None:
                        doc = {'start': spool.tell(), 'ends': [], 'rows': 0, 'keys': [], 'minhash': []}
                    spool.write(raw[i])
                    doc['ends'].append(spool.tell())
                    doc['rows'] = doc['rows'] + rows[i]
                    doc['keys'].append(int(keys[i]))
                    if sigs is not None:
                        doc['minhash'].append((sigs[i], has_words[i], bands[i]))
                    read_bytes += len(raw[i])
                    if ends:
                        finish_document(doc, st, source_id)
                        doc = None
                for f, n_bad in ended:
                    st['bad_lines'] += n_bad
                if doc is None and time.time() - last_checkpoint >= checkpoint_s and (where or ended):
                    # between documents: resume after the last piece taken (or the last file ended)
                    position = (where[-1][0], where[-1][1] + 1) if where else (0, 0)
                    if ended and ended[-1][0] >= position[0]:
                        position = (ended[-1][0] + 1, 0)
                    save_clean(source_id, *position)
                    last_checkpoint = time.time()
                if time.time() - t_log >= 1:
                    print(f"clean | {read_bytes / 1e6:.1f} MB | {read_bytes / 1e6 / (time.time() - t0):.1f} MB/s")
                    t_log = time.time()
        except data.DataError as e:  # a bad line or an unreadable file: the message names file, line and field
            raise SystemExit(str(e)) from None
        if st['docs_out'] == 1 and val_fraction > 0:
            # one document (a single text like Shakespeare): split it by position, nanoGPT style
            n_docs = doc_file.tell() // DOC.itemsize
            if last_kept.get('doc') != n_docs - 1:  # kept before an interruption: its pieces from pieces.bin
                piece_file.flush()
                rows = np.fromfile(tmp('pieces.bin'), PIECE)
                mine = np.flatnonzero(rows['doc'] == n_docs - 1)
                last_kept = {'start': int(rows['end'][mine[0] - 1]) if mine[0] else 0, 'ends': rows['end'][mine].tolist()}
            splits.append([n_docs - 1, position_split(last_kept['start'], last_kept['ends'], st['chars_out'])])
        dropped = ', '.join(f"{k} {v:,}" for k, v in st['dropped'].items() if v) or 'none dropped'
        print(f"clean {spec}: {st['docs_in']:,} docs in, {st['docs_out']:,} out ({dropped}); "
              f"{st['boilerplate_lines']:,} boilerplate lines, {st['control_chars']:,} control chars removed; "
              f"{st['bad_lines']:,} bad lines dropped; {st['chars_out'] / 1e6:.1f}M chars")
        if st['docs_out'] == 0:
            print(f"note: nothing of {spec} is left after cleaning: it adds no documents")
        save_clean(source_id + 1, 0, 0)
    spool.truncate()  # a dropped last document may lie beyond the end
    for f in (spool, piece_file, doc_file, seen_file, sigs_file):
        f.close()
    progress['seconds']['clean'] = progress['seconds'].get('clean', 0) + time.time() - t0
    checkpoint('tokenizer')
del cleaner  # its dedup state is not needed after cleaning
t_clean = progress['seconds']['clean']

# The cleaned corpus: per piece its end in the spool and its document; per document its content
# hash and source. A one-document source becomes two documents at its split point.
pieces, docs = np.fromfile(tmp('pieces.bin'), PIECE), np.fromfile(tmp('docs.bin'), DOC)
piece_end, piece_doc, doc_key, doc_source = pieces['end'], pieces['doc'], docs['key'], docs['source']
for doc, cut in reversed(progress['clean']['splits']):  # the last first: earlier numbers stay put
    k = np.flatnonzero((piece_doc == doc) & (piece_end >= cut))[0]  # the piece the cut falls in (or ends)
    piece_end, piece_doc = np.insert(piece_end, k, cut), np.insert(piece_doc, k, doc)
    piece_doc[k + 1:] += 1  # the rest of the document is the val document, doc + 1
    doc_key[doc] = 0  # the smallest key goes to train, the largest to val (below)
    doc_key, doc_source = np.insert(doc_key, doc + 1, 2 ** 64 - 1), np.insert(doc_source, doc + 1, doc_source[doc])
del pieces, docs
n_docs = len(doc_key)
piece_start = np.concatenate(([0], piece_end[:-1]))
doc_bytes = np.bincount(piece_doc, weights=piece_end - piece_start, minlength=n_docs).astype(np.int64)
if n_docs == 0 or doc_bytes.sum() == 0:
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


def read_spool(a, b):
    with open(tmp('text.bin'), 'rb') as f:
        f.seek(a)
        return f.read(b - a)


# ----------------------------------------------------------------------------- tokenizer
t0 = time.time()
if progress['phase'] == 'tokenizer':
    if tokenizer_type == 'bpe':
        # train documents in content-hash order: a spread over every source, not just the first files
        sample, n_chars = [], 0
        doc_start = np.concatenate(([0], np.cumsum(doc_bytes)))
        for i in np.argsort(doc_key, kind='stable'):
            if n_chars >= tokenizer_train_chars:
                break
            if use[i] and not is_val[i]:
                want = tokenizer_train_chars - n_chars  # no more than that of a long document is read
                text = read_spool(doc_start[i], min(doc_start[i + 1], doc_start[i] + 4 * want))
                sample.append(text.decode('utf-8', 'ignore')[:want])  # 'ignore': a character cut at the end
                n_chars += len(sample[-1])
        tok = train_bpe(sample, vocab_size)
        del sample
    elif tokenizer_type == 'char':
        chars = set()  # every character of train and val, as nanoGPT (a val character must have an id)
        group = np.cumsum(piece_end - piece_start) // (16 << 20)  # ~16 MB of whole pieces at a time
        for ids in np.split(np.arange(len(piece_end)), np.flatnonzero(np.diff(group)) + 1):
            chars.update(read_spool(piece_start[ids[0]], piece_end[ids[-1]]).decode('utf-8'))
        tok = char_tokenizer(''.join(sorted(chars)))
    elif tokenizer_type == 'gpt2':
        try:
            tok = gpt2_tokenizer()
        except RuntimeError as e:  # offline without tiktoken's cache: its message says what to do
            raise SystemExit(str(e)) from None
    elif tokenizer_type.endswith('.json') and os.path.isfile(tokenizer_type):
        tok = Tokenizer.load(tokenizer_type)
    else:
        raise SystemExit(f"tokenizer_type={tokenizer_type!r}: use bpe, char, gpt2, or the path of an existing "
                         f"tokenizer.json")
    tok.save(tmp('tokenizer.json'))
    progress['seconds']['tokenizer'] = time.time() - t0
    checkpoint('tokenise')
tok = Tokenizer.load(tmp('tokenizer.json'))
dtype = corpus.token_dtype(tok.n_vocab)
t_tokenizer = progress['seconds']['tokenizer']
print(f"tokenizer: {tok.identity} ({tok.n_vocab:,} ids -> {np.dtype(dtype).name}) in {t_tokenizer:.1f}s")

# ----------------------------------------------------------------------------- tokenise
# The pieces of the documents to use are read back from the spool by the workers, ~1 MB a task,
# encoded, each document prefixed by <|endoftext|> (corpus.tokenise_task), and appended in order to
# a token spool; bench/bench_tokenize.py times this against raw tiktoken. One progress line per
# second; a checkpoint records the tasks done and the spool's size.
t0 = time.time()
todo = np.flatnonzero(use[piece_doc])  # pieces to tokenise
doc_first = np.concatenate(([True], piece_doc[1:] != piece_doc[:-1]))  # a piece that starts its document
task_of = np.cumsum(piece_end[todo] - piece_start[todo]) // task_bytes  # ~task_bytes of consecutive pieces a task
cuts = np.flatnonzero((np.diff(task_of) != 0) | (np.diff(todo) != 1)) + 1
tasks = np.split(todo, cuts) if len(todo) else []
total_bytes = int((piece_end[todo] - piece_start[todo]).sum())
if progress['phase'] == 'tokenise':
    at = progress.get('tokenise', {'tasks': 0, 'sizes': {}})
    token_file = open_appending('tokens.bin', at['sizes'].get('tokens.bin', 0))
    count_file = open_appending('piece_tokens.bin', at['sizes'].get('piece_tokens.bin', 0))
    done = int((piece_end[todo] - piece_start[todo])[:sum(len(t) for t in tasks[:at['tasks']])].sum())
    last_checkpoint, t_log, done_start = time.time(), time.time(), done

    def save_tokenise(n_tasks):
        for f in (token_file, count_file):
            f.flush()
        checkpoint('tokenise', tokenise={'tasks': n_tasks, 'sizes': {'tokens.bin': token_file.tell(),
                                                                    'piece_tokens.bin': count_file.tell()}})

    work = ((tmp('text.bin'), tmp('tokenizer.json'), dtype, np.append(piece_start[ids[0]], piece_end[ids]),
             doc_first[ids]) for ids in tasks[at['tasks']:])
    try:
        for k, (tokens, counts) in enumerate(corpus.ordered_map(pool, corpus.tokenise_task, work, in_flight),
                                             start=at['tasks'] + 1):
            token_file.write(tokens)
            count_file.write(counts.tobytes())
            done += int(piece_end[tasks[k - 1][-1]] - piece_start[tasks[k - 1][0]])
            if time.time() - last_checkpoint >= checkpoint_s:
                save_tokenise(k)
                last_checkpoint = time.time()
            if time.time() - t_log >= 1 and done < total_bytes:
                corpus.log_progress('tokenise', done - done_start, total_bytes - done_start, t0)
                t_log = time.time()
    except data.DataError as e:  # a character that a reused char tokenizer lacks
        raise SystemExit(str(e)) from None
    corpus.log_progress('tokenise', done - done_start, total_bytes - done_start, t0, final=True)
    save_tokenise(len(tasks))
    token_file.close()
    count_file.close()
    progress['seconds']['tokenise'] = progress['seconds'].get('tokenise', 0) + time.time() - t0
    checkpoint('write')
if pool is not None:  # the workers' work is done; ended now, their peak memory counts in the stats
    pool.close()
    pool.join()
    pool = None
t_tokenise = progress['seconds']['tokenise']
doc_tokens = np.bincount(piece_doc[todo], weights=np.fromfile(tmp('piece_tokens.bin'), np.int64),
                         minlength=n_docs).astype(np.int64)
token_offsets = np.concatenate(([0], np.cumsum(doc_tokens)))  # where each document is in tokens.bin

# ----------------------------------------------------------------------------- mixing
train_ids = {spec: np.flatnonzero((doc_source == sid) & use & ~is_val) for sid, (spec, _, _) in enumerate(sources)}
chosen = corpus.mix_documents({spec: doc_tokens[ids] for spec, ids in train_ids.items()}, rules, seed)
streams = {'train': np.concatenate([ids[chosen[spec]] for spec, ids in train_ids.items()]).astype(np.int64),
           'val': np.flatnonzero(is_val)}
for sid, (spec, _, _) in enumerate(sources):
    picked = train_ids[spec][chosen[spec]]
    ids = streams['val'][doc_source[streams['val']] == sid]
    stats[spec].update(train_tokens=int(doc_tokens[picked].sum()), train_docs_written=len(picked),
                       unique_train_docs=len(np.unique(picked)), val_tokens=int(doc_tokens[ids].sum()),
                       val_bytes=int(doc_bytes[ids].sum()))
train_tokens = sum(s['train_tokens'] for s in stats.values())
val_tokens = sum(s['val_tokens'] for s in stats.values())
if train_tokens == 0:
    raise SystemExit("train split is empty: every document went to val or was sampled away; check dataset_sampling")

# ----------------------------------------------------------------------------- write
# Each split is the token stream of its documents in order (train: the mix), cut into shards of
# shard_tokens tokens, copied from the token spool: written to a temp name and renamed, and the
# shards done recorded, so a resumed run starts at the next shard. A document may run on from
# one shard into the next; train.py never draws a row across shards.
t0 = time.time()
itemsize = np.dtype(dtype).itemsize
shards = progress.get('shards', {'train': [], 'val': []})
with open(tmp('tokens.bin'), 'rb') as src:
    for split, ids in streams.items():
        lengths = doc_tokens[ids]
        ends = np.cumsum(lengths)
        begins = ends - lengths  # where each document starts in the split's stream
        for k in range(len(shards[split]), -(-int(ends[-1]) // shard_tokens)):
            lo, hi = k * shard_tokens, min((k + 1) * shard_tokens, int(ends[-1]))
            inside = slice(np.searchsorted(ends, lo, 'right'), np.searchsorted(begins, hi, 'left'))
            a = token_offsets[ids[inside]] + np.maximum(lo - begins[inside], 0)  # the parts of those documents in the shard
            b = token_offsets[ids[inside]] + np.minimum(hi - begins[inside], lengths[inside])
            name = corpus.shard_name(split, k)
            with open(tmp(name + '.part'), 'wb') as out:
                corpus.copy_ranges(src, a, b, out, itemsize)
            os.replace(tmp(name + '.part'), tmp(name))
            documents = int(np.count_nonzero((begins[inside] >= lo) & (lengths[inside] > 0)))  # that start in it
            shards[split].append({'file': name, 'tokens': hi - lo, 'documents': documents})
            checkpoint('write', shards=shards)
t_write = time.time() - t0

# ----------------------------------------------------------------------------- stats
peak_mb = {'main': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KB on Linux
           'largest_worker': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}
tokenise_mb_s = total_bytes / 1e6 / max(t_tokenise, 1e-9)
totals = {k: sum(s[k] for s in stats.values()) for k in ('docs_in', 'docs_out', 'chars_in', 'chars_out', 'train_docs',
                                                        'val_docs', 'train_tokens', 'val_tokens', 'val_bytes')}
totals['dropped'] = {r: sum(s['dropped'][r] for s in stats.values()) for r in corpus.DROP_REASONS}
timing = {'clean_s': round(t_clean, 2), 'tokenizer_s': round(t_tokenizer, 2), 'tokenise_s': round(t_tokenise, 2),
          'tokenise_mb_per_s': round(tokenise_mb_s, 1), 'write_s': round(t_write, 2),
          'total_s': round(time.time() - t_start, 2), 'peak_rss_mb': {k: round(v) for k, v in peak_mb.items()},
          'resumed_from': resumed_from}
with open(tmp('stats.json'), 'w') as f:
    json.dump({'dataset': dataset, 'total': totals, 'sources': stats, 'timing': timing, 'config': config}, f, indent=1)
meta = {'dataset': dataset, 'tokenizer': 'tokenizer.json', 'tokenizer_kind': tok.kind,
        'tokenizer_identity': tok.identity, 'vocab_size': tok.n_vocab, 'dtype': np.dtype(dtype).name,
        'train_tokens': train_tokens, 'val_tokens': val_tokens, 'val_bytes': totals['val_bytes'],
        'bos_id': tok.eot_id, 'sources': {spec: s['source'] for spec, s in stats.items()},
        'documents': {'train': totals['train_docs'], 'val': totals['val_docs']}, 'seed': seed,
        'shard_tokens': shard_tokens, 'shards': shards}
with open(tmp('meta.json'), 'w') as f:
    json.dump(meta, f, indent=1)

# ----------------------------------------------------------------------------- swap in
# Renames only: meta.json goes first (the folder reads as incomplete while the shards change) and
# comes back last. Ctrl-C and SIGTERM wait until the renames are done; only kill -9 in these few
# milliseconds could leave the folder without meta.json, i.e. visibly incomplete, never mixed.
outputs = [s['file'] for split in ('train', 'val') for s in shards[split]] + ['tokenizer.json', 'stats.json', 'meta.json']
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
os.makedirs(out_dir, exist_ok=True)
if os.path.exists(os.path.join(out_dir, 'meta.json')):
    os.remove(os.path.join(out_dir, 'meta.json'))
for name in os.listdir(out_dir):  # the shards of the dataset before (more of them, or train.bin/val.bin)
    if re.fullmatch(r'(train|val)(_\d{6})?\.bin', name) and name not in outputs:
        os.remove(os.path.join(out_dir, name))
for name in outputs:
    os.replace(tmp(name), os.path.join(out_dir, name))
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
shutil.rmtree(tmp_dir)
for spec, s in stats.items():
    share = s['train_tokens'] / max(1, train_tokens)
    print(f"{spec}: train {s['train_tokens']:,} tokens ({share:.1%} of the mix, {s['train_docs_written']:,} docs), "
          f"val {s['val_tokens']:,} tokens ({s['val_docs']:,} docs)")
print(f"wrote {out_dir}/: {len(shards['train'])} train shard(s) {train_tokens:,} tokens, {len(shards['val'])} val "
      f"shard(s) {val_tokens:,} tokens ({np.dtype(dtype).name}); clean {t_clean:.1f}s, tokenizer {t_tokenizer:.1f}s, "
      f"tokenise {t_tokenise:.1f}s ({tokenise_mb_s:.1f} MB/s), total {timing['total_s']:.1f}s; peak memory "
      f"{peak_mb['main']:,.0f} MB (largest worker {peak_mb['largest_worker']:,.0f} MB)")
