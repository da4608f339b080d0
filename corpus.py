"""
The pretraining corpus pipeline, the pieces prepare.py tells its story with: sources (the stdlib,
local files and folders, parquet/arrow/saved datasets, downloads), cleaning (normalise, control
characters, boilerplate lines, length, exact and MinHash near-duplicate removal), mixing,
tokenising on worker processes, and the token shards train.py and eval.py read (token_shards).
Files are read with data.py's readers (.gz/.zst, bad bytes as per-line errors).
"""

import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import re
import signal
import sys
import sysconfig
import time
import unicodedata
import urllib.error
import urllib.request
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from data import COMPRESSION, DataError, BadField, decode_lines, decompress_error, open_binary, scan_jsonl, split_compression

# ----------------------------------------------------------------------------- sources

REMOTE = {
    'tinyshakespeare': {'url': 'https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/'
                               'input.txt', 'size': 1115394},
    'tinystories': {'url': 'https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/'
                           'TinyStoriesV2-GPT4-valid.txt'},
    'fineweb-edu': {'url': 'https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/'
                           'shard_00000.parquet'},
}
DOC_SEPARATOR = '<|endoftext|>'  # a line of this splits a .txt file into documents (TinyStories)
TEXT_EXTENSIONS = ('.txt', '.md', '.rst', '.py', '.jsonl')  # each also compressed: .jsonl.gz, .txt.zst, ...


def is_corpus_file(name):
    """Whether a directory source reads this file: text or JSONL (compressed or not) or parquet.
    (.arrow files are read when named, or as a save_to_disk folder: a `datasets` cache folder
    holds .arrow copies of everything it ever processed.)"""
    return split_compression(name)[0].endswith(TEXT_EXTENSIONS) or name.endswith('.parquet')


def download(url, dest, size=None, sha256=None, timeout=30):
    """Fetch url to dest: streamed to dest.part, renamed when complete. A partial download is kept
    (and resumed next time) only when the server takes byte ranges; size and sha256 are checked
    when known. A refused resume (HTTP 416) finishes or restarts the download. An unreachable URL
    or an HTTP error raises SystemExit with one line saying what to do instead."""
    if os.path.exists(dest):
        return dest
    os.makedirs(os.path.dirname(dest) or '.', exist_ok=True)
    part = dest + '.part'
    have = os.path.getsize(part) if os.path.exists(part) else 0
    request = urllib.request.Request(url, headers={'Range': f'bytes={have}-'} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:  # the server answered: not an offline problem
        e.close()
        if e.code == 416 and have:  # Range Not Satisfiable: nothing left after byte `have`
            return _resume_refused(url, dest, have, e.headers.get('Content-Range'), size, sha256, timeout)
        raise SystemExit(f"could not download {url}: the server answered HTTP {e.code} {e.reason}; check the URL, "
                         f"or fetch it elsewhere and pass the file with --sources=PATH") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, 'reason', e)
        raise SystemExit(f"could not download {url} ({reason}); offline? Fetch it elsewhere and pass the "
                         f"file with --sources=PATH") from None
    resumable = response.headers.get('Accept-Ranges') == 'bytes' or response.status == 206
    mode = 'ab' if response.status == 206 else 'wb'
    length = response.headers.get('Content-Length')
    if size is None and length is not None and length.isdigit():  # the server's word, when we have none
        size = int(length) + (have if response.status == 206 else 0)
    try:
        with response, open(part, mode) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except (OSError, urllib.error.URLError) as e:
        if not resumable and os.path.exists(part):
            os.remove(part)
        raise SystemExit(f"download of {url} broke off ({e}); run again to "
                         f"{'resume' if resumable else 'retry'}, or pass a local copy with --sources=PATH") from None
    return _finish_download(url, dest, size, sha256)


def _resume_refused(url, dest, have, content_range, size, sha256, timeout):
    """HTTP 416 to 'Range: bytes=have-': the server's file has `have` bytes or fewer. Exactly
    `have` (its Content-Range says 'bytes */have'): the part file is whole, a run stopped before
    renaming it. Fewer: the file changed on the server, and the part is stale: start over."""
    total = re.fullmatch(r'bytes \*/(\d+)', content_range or '')
    if total and int(total.group(1)) == have:
        return _finish_download(url, dest, have if size is None else size, sha256)
    os.remove(dest + '.part')
    print(f"{url}: the server refused to resume at byte {have:,} (HTTP 416, {content_range or 'no size given'}); "
          f"downloading it again from the start")
    return download(url, dest, size, sha256, timeout)


def _finish_download(url, dest, size, sha256):
    """Check dest.part against the size and sha256 when known, then rename it to dest."""
    part = dest + '.part'
    got = os.path.getsize(part)
    digest = _sha256(part) if sha256 else None
    if (size is not None and got != size) or (sha256 and digest != sha256):
        os.remove(part)
        want = f"{size if size is not None else '?'} bytes" + (f", sha256 {sha256}" if sha256 else '')
        raise SystemExit(f"download of {url} is corrupt (got {got} bytes{', sha256 ' + digest if digest else ''}; "
                         f"expected {want}); removed it, run again")
    os.replace(part, dest)
    return dest


def _sha256(path):
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def stdlib_files():
    """The interpreter's standard library *.py files, sorted: no site-packages, caches or test
    fixture folders (test/*data*), nor the task suite's held-out code modules (the answers to its
    code test would be pretraining text). (iter_documents skips the few that are not UTF-8.)"""
    from tasks import CODE_TEST_MODULES  # here, not at the top: tasks imports data
    root = sysconfig.get_paths()['stdlib']
    held_out = {os.path.join(root, *m.split('/')) + '.py' for m in CODE_TEST_MODULES}
    files = []
    for folder, dirs, names in os.walk(root):
        rel = os.path.relpath(folder, root)
        in_tests = any(part in ('test', 'tests', 'idle_test') for part in rel.split(os.sep))
        dirs[:] = sorted(d for d in dirs if d not in ('site-packages', 'dist-packages', '__pycache__')
                         and not (in_tests and 'data' in d))
        files += [os.path.join(folder, n) for n in sorted(names) if n.endswith('.py')]
    return root, [f for f in files if f not in held_out]


def read_text_file(path, bad=None):
    """A text file's documents: the whole file, or the parts between <|endoftext|> lines.

    Decoded line by line: a line that is not UTF-8 is dropped, and reported (its error is appended
    to `bad`, and the count printed), never the rest of the file. Dropped rather than decoded with
    U+FFFD: replacement characters would be trained on as text, while a lost line is counted and
    named. A file in another encoding loses every non-ASCII line this way: re-save it as UTF-8."""
    return (text for text, _ in read_text_pieces(path, bad))


def read_text_pieces(path, bad=None, piece_chars=0):
    """(text, ends_document) for each piece of each document of a text file (see read_text_file).
    A document longer than piece_chars comes in pieces cut at the first line end after piece_chars
    characters, so a 1 GB document never sits in memory whole; 0 = whole documents."""
    bad = [] if bad is None else bad
    n_before = len(bad)
    doc, size = [], 0
    for block in _text_blocks(path, bad):
        parts = _SEPARATOR_LINE.split(block)  # text, separator, text, ...: the separators end documents
        for i, part in enumerate(parts):
            if i % 2:
                yield ''.join(doc), True
                doc, size = [], 0
                continue
            doc.append(part)
            size += len(part)
            if piece_chars and size >= piece_chars:  # cut at the first line end after piece_chars
                text = ''.join(doc)
                cut = text.find('\n', piece_chars - 1) + 1
                while cut > 0:
                    yield text[:cut], False
                    text = text[cut:]
                    cut = text.find('\n', piece_chars - 1) + 1 if len(text) >= piece_chars else 0
                doc, size = [text], len(text)
    yield ''.join(doc), True
    _say_dropped(path, bad[n_before:])


_SEPARATOR_LINE = re.compile(r'(?m)^([^\S\n]*<\|endoftext\|>[^\S\n]*(?:\n|\Z))')  # a line that is only <|endoftext|>


def _text_blocks(path, bad, block_bytes=1 << 20):
    """A text file as decoded blocks of whole lines, ~block_bytes each, newlines translated as
    open() does. A block that is not all UTF-8 is decoded line by line (read_lines): its bad lines
    are dropped and their errors appended to `bad`, with their line numbers."""
    lineno, carry = 0, b''
    with open_binary(path) as f:
        while True:
            try:
                chunk = f.read(block_bytes)
            except (EOFError, OSError, zlib.error) as e:
                decompress_error(path, e, lineno)
                raise
            raw = carry + chunk
            if not raw:
                return
            cut = raw.rfind(b'\n') + 1 if chunk else len(raw)  # whole lines; at the end, the rest
            if cut == 0:
                carry = raw
                continue
            raw, carry = raw[:cut], raw[cut:]
            try:
                text = raw.decode('utf-8')
                if '\r' in text:  # Windows and old Mac line ends, as open() reads them
                    text = text.replace('\r\n', '\n').replace('\r', '\n')
                lineno += text.count('\n') + (not text.endswith('\n'))
            except UnicodeDecodeError:
                lines = []
                for lineno, line, error in decode_lines(io.BytesIO(raw), path, lineno):
                    if error is None:
                        lines.append(line)
                    else:
                        bad.append(error)
                text = ''.join(lines)
            if text:
                yield text
            if not chunk:
                return


def cut_pieces(text, piece_chars):
    """(piece, ends_document) of one document, cut as read_text_pieces cuts: at the first line end
    after piece_chars characters (a text without line ends stays whole); 0 = the whole text."""
    start = 0
    while piece_chars and len(text) - start > piece_chars:
        cut = text.find('\n', start + piece_chars - 1) + 1
        if cut <= 0 or cut == len(text):
            break
        yield text[start:cut], False
        start = cut
    yield text[start:] if start else text, True


def file_pieces(path, skip_bad_lines=False, bad=None, piece_chars=0):
    """(text, ends_document) for each piece of each document of one file of any kind (read_file):
    what prepare.py streams through cleaning and tokenising. A file that cannot be read is a
    DataError; dropped lines are appended to `bad`, as read_file does."""
    try:
        if is_table_or_jsonl(path):  # whole documents (a JSON line, a table row), then cut
            for text in read_file(path, skip_bad_lines, bad):
                yield from cut_pieces(text, piece_chars)
        else:  # text: cut while reading, the document is never whole in memory
            yield from read_text_pieces(path, bad, piece_chars)
    except OSError as e:  # unreadable (permissions), gone since it was listed, a directory, ...
        raise DataError(f"{path}: cannot read it ({e.strerror or e}); fix its permissions or leave it out "
                        f"of --sources") from None


def _say_dropped(path, errors):
    if errors:
        print(f"{path}: dropped {len(errors):,} bad line(s); first: {errors[0]}")


def read_jsonl_text(path, skip_bad_lines=False, bad=None):
    """The "text" field of each line (MiniMind's pretraining format). A bad line (bad JSON, no
    "text" string, bytes that are not UTF-8) raises DataError unless skip_bad_lines, which drops
    it, appends its error to `bad` and prints the count."""
    def parse(obj):
        if not isinstance(obj.get('text'), str):
            raise BadField('text', "missing or not a string (pretraining JSONL needs {\"text\": \"...\"})")
        return obj['text']
    bad = [] if bad is None else bad
    n_before = len(bad)
    for _, text, error in scan_jsonl(path, parse):
        if error is None:
            yield text
        elif skip_bad_lines:
            bad.append(error)
        else:
            raise DataError(error + " (fix the line, or pass --skip_bad_lines=True)")
    _say_dropped(path, bad[n_before:])


def _pyarrow(path, what):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SystemExit(f"{path} is {what}: reading it needs pyarrow (pip install pyarrow)") from None
    return pyarrow


def _text_rows(path, columns, batches, skip_bad_lines=False, bad=None):
    """The strings of the 'text' column of a table read as batches (parquet row groups, Arrow
    record batches; columns: the table's column names). A row whose text is null or not a string
    is a bad line: DataError, or with skip_bad_lines dropped as read_jsonl_text does."""
    if 'text' not in columns:
        raise DataError(f"{path}: no 'text' column (it has {', '.join(columns[:10])}); pretraining data in "
                        f"tables needs the documents in a string column named 'text'")
    bad = [] if bad is None else bad
    n_before, row = len(bad), 0
    for batch in batches:
        for text in batch.column('text').to_pylist():
            if isinstance(text, str):
                yield text
            else:
                error = (f"{path}: row {row} (counting from 0): field 'text': expected a string, got "
                         f"{'null' if text is None else type(text).__name__}")
                if not skip_bad_lines:
                    raise DataError(error + " (fix the row, or pass --skip_bad_lines=True)")
                bad.append(error)
            row += 1
    _say_dropped(path, bad[n_before:])


def read_parquet_text(path, skip_bad_lines=False, bad=None):
    """The "text" column of a parquet file, row group by row group (see _text_rows)."""
    pq = _pyarrow(path, 'a parquet file').parquet
    try:
        pf = pq.ParquetFile(path)
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{path}: not a readable parquet file ({e})") from None
    batches = (pf.read_row_group(i, columns=['text']) for i in range(pf.num_row_groups))
    yield from _text_rows(path, pf.schema_arrow.names, batches, skip_bad_lines, bad)


def read_arrow_text(path, skip_bad_lines=False, bad=None):
    """The "text" column of an Arrow IPC file, batch by batch from a memory map (see _text_rows):
    the stream format Hugging Face `datasets` writes, or the random-access file format."""
    pa = _pyarrow(path, 'an Arrow file')
    with pa.memory_map(path) as source:  # an unreadable file raises OSError here: iter_documents names it
        try:
            try:
                reader = pa.ipc.open_stream(source)
                batches = reader
            except pa.ArrowInvalid:  # not a stream: the file format (pyarrow.ipc.new_file, Feather v2)
                source.seek(0)
                reader = pa.ipc.open_file(source)
                batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable Arrow file ({e})") from None
        yield from _text_rows(path, reader.schema.names, batches, skip_bad_lines, bad)


def is_table_or_jsonl(path):
    """Whether read_file reads path as records (.jsonl, .parquet, .arrow) rather than as text."""
    return split_compression(path)[0].endswith('.jsonl') or path.endswith(('.parquet', '.arrow'))


def read_file(path, skip_bad_lines=False, bad=None):
    """A file's documents, by its name: .jsonl, .parquet, .arrow, else text; .gz and .zst
    (.jsonl.gz, .txt.zst, ...) decompressed as they are read."""
    if split_compression(path)[0].endswith('.jsonl'):
        return read_jsonl_text(path, skip_bad_lines, bad)
    if path.endswith('.parquet'):
        return read_parquet_text(path, skip_bad_lines, bad)
    if path.endswith('.arrow'):
        return read_arrow_text(path, skip_bad_lines, bad)
    return read_text_file(path, bad)


def _json_file(path):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise SystemExit(f"{path}: cannot read it as JSON ({e})") from None


def saved_dataset(folder):
    """(description, [.arrow files in order]) of a Hugging Face `datasets` folder written by
    save_to_disk (arrow files, dataset_info.json, state.json), or None when folder is not one. A
    DatasetDict folder (dataset_dict.json and a folder per split) gives its 'train' split, and
    says so.

    Read with pyarrow's IPC reader, not datasets.load_from_disk: pyarrow is needed for parquet
    anyway, while `datasets` is a large package we do not otherwise require (seconds to import).
    load_from_disk concatenates the tables of the files listed in state.json's "_data_files", each
    an Arrow IPC stream, which is what is read here, file by file and batch by batch from a memory
    map, so memory stays flat and an error names the file and the row."""
    what = ''
    if os.path.isfile(os.path.join(folder, 'dataset_dict.json')):
        splits = _json_file(os.path.join(folder, 'dataset_dict.json')).get('splits') or []
        if 'train' not in splits:
            raise SystemExit(f"{folder} is a Hugging Face DatasetDict without a 'train' split (it has "
                             f"{', '.join(map(str, splits)) or 'none'}): pass the folder of the split to read, "
                             f"e.g. --sources={os.path.join(folder, str(splits[0]) if splits else 'SPLIT')}")
        others = [s for s in splits if s != 'train']
        print(f"{folder}: a Hugging Face DatasetDict with splits {', '.join(splits)}; reading 'train'"
              + (f" (for another, pass its folder: --sources={os.path.join(folder, others[0])})" if others else ''))
        folder, what = os.path.join(folder, 'train'), "split 'train' of "
    state = os.path.join(folder, 'state.json')
    if not (os.path.isfile(state) and os.path.isfile(os.path.join(folder, 'dataset_info.json'))):
        if what:
            raise SystemExit(f"{folder}: not a Hugging Face dataset folder (no state.json and dataset_info.json)")
        return None
    names = [f.get('filename') if isinstance(f, dict) else None for f in _json_file(state).get('_data_files') or []]
    if not names or None in names:
        raise SystemExit(f"{state}: no list of Arrow files (\"_data_files\": [{{\"filename\": ...}}]); save "
                         f"the dataset again with Dataset.save_to_disk")
    files = [os.path.join(folder, n) for n in names]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise SystemExit(f"{folder}: state.json lists {missing[0]}, which is missing ({len(missing)} of {len(files)} "
                         f"files): an unfinished copy or save? Save the dataset again")
    return f"Hugging Face dataset ({what}save_to_disk folder {folder}, {len(files)} Arrow file(s))", files


def download_path(url, download_dir, name=None):
    """Where url is cached: its file name (or the REMOTE name) plus a hash of the whole URL, so two
    URLs that end in the same file name (.../a/input.txt, .../b/input.txt) never share a file."""
    path = url.split('?')[0]
    suffix = os.path.splitext(path)[1] or '.txt'
    if suffix in COMPRESSION:  # keep what it holds: web.jsonl.gz -> web-<hash>.jsonl.gz, read as JSONL
        suffix = os.path.splitext(path[:-len(suffix)])[1] + suffix
    stem = (name if name in REMOTE else os.path.basename(path) or 'download').removesuffix(suffix)
    return os.path.join(download_dir, f"{stem}-{hashlib.sha256(url.encode()).hexdigest()[:12]}{suffix}")


def resolve_source(spec, download_dir):
    """A source spec -> (description, [paths or 'stdlib' files]). spec: 'stdlib', a name in
    REMOTE, an http(s) URL, a file, a glob, or a directory: a Hugging Face save_to_disk folder
    (see saved_dataset), else its .txt/.md/.rst/.py/.jsonl files (also .gz/.zst) and .parquet
    shards, sorted. (--sources is split at commas before this: several URLs are several specs, each
    downloaded to its own file.)"""
    if spec == 'stdlib':
        root, files = stdlib_files()
        return f"Python {sys.version.split()[0]} standard library at {root}", files
    if spec in REMOTE or spec.startswith(('http://', 'https://')):
        info = REMOTE.get(spec, {'url': spec})
        return info['url'], [download(info['url'], download_path(info['url'], download_dir, spec),
                                      info.get('size'), info.get('sha256'))]
    if os.path.isdir(spec):
        saved = saved_dataset(spec)
        if saved is not None:
            return saved[0], _readable(spec, saved[1])
        files = sorted(os.path.join(d, n) for d, _, names in os.walk(spec) for n in names if is_corpus_file(n))
        skipped = [f for f in files if not os.path.isfile(f)]  # broken symlinks (editors' .#a.txt locks), pipes
        if skipped:
            print(f"{spec}: skipped {len(skipped)} name(s) that are not files (a broken symlink?), e.g. {skipped[0]}")
            files = [f for f in files if os.path.isfile(f)]
        if not files:
            raise SystemExit(f"{spec}: no {'/'.join(TEXT_EXTENSIONS)} files (nor .gz/.zst ones) or .parquet shards in "
                             f"this directory, and it is not a Hugging Face save_to_disk folder")
        return f"directory {spec}", _readable(spec, files)
    if any(c in spec for c in '*?['):
        files = sorted(f for f in glob.glob(spec, recursive=True) if os.path.isfile(f))
        if not files:
            raise SystemExit(f"{spec}: the pattern matches no files")
        return f"glob {spec}", _readable(spec, files)
    if os.path.isfile(spec):
        return f"file {spec}", _readable(spec, [spec])
    known = ', '.join(['stdlib'] + list(REMOTE))
    raise SystemExit(f"input {spec!r} is not a file, directory, glob or URL, nor a known source ({known})")


def _readable(spec, files):
    """files, when each can be read: an unreadable one stops the run now, not an hour into cleaning
    (iter_documents still turns a read that fails later into a DataError)."""
    unreadable = [f for f in files if not os.access(f, os.R_OK)]
    if unreadable:
        raise SystemExit(f"{spec}: {len(unreadable)} file(s) cannot be read (permission denied), e.g. "
                         f"{unreadable[0]}; fix their permissions or leave them out of --sources")
    return files


def iter_documents(files, skip_bad_lines=False, counts=None):
    """Every document of a list of files, in order. Lines dropped while reading (see read_file:
    bytes that are not UTF-8; bad JSONL lines or parquet/Arrow rows with skip_bad_lines) are
    printed per file and counted in counts['bad_lines']. A file that cannot be read at all is a
    DataError, and so is a compressed file that is corrupt or cut short."""
    for path in files:
        bad = []
        for text, _ in file_pieces(path, skip_bad_lines, bad):
            yield text
        if counts is not None:
            counts['bad_lines'] = counts.get('bad_lines', 0) + len(bad)


# ----------------------------------------------------------------------------- cleaning

_CONTROL = re.compile(r'[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]')
# Lines containing one of these phrases (any case) are boilerplate ...
BOILERPLATE_PHRASES = ('lorem ipsum', 'all rights reserved', 'click here to', 'cookie policy', 'cookie settings',
                       'accept cookies', 'enable javascript', 'javascript is disabled', 'subscribe to our newsletter',
                       'sign up for our newsletter', 'this page intentionally left blank', 'skip to main content')
# ... and so are lines that are only one of these placeholders.
BOILERPLATE_LINES = ('[deleted]', '[removed]', 'todo', 'tbd', 'placeholder', 'share this', 'share this article',
                     'print this page', 'advertisement', 'read more')


def boilerplate_lines(text):
    """Line spans [(start, end)] of text that are boilerplate. str.find over lower-cased text
    (a regex alternation is ~20x slower); lines are looked at only where a phrase occurs."""
    low = text.lower()
    if len(low) != len(text):  # a few characters lower-case to two ('İ'): use ASCII lower-casing
        low = text.encode('utf-8').lower().decode('utf-8')  # same length, only A-Z change
    spans = set()
    for phrase, whole_line in [(p, False) for p in BOILERPLATE_PHRASES] + [(p, True) for p in BOILERPLATE_LINES]:
        i = low.find(phrase)
        while i >= 0:
            start, end = low.rfind('\n', 0, i) + 1, low.find('\n', i)
            end = len(low) if end < 0 else end + 1
            if not whole_line or low[start:end].strip() == phrase:
                spans.add((start, end))
            i = low.find(phrase, end)
    return sorted(spans)


def clean_text(text, normalize='NFC', strip_control=True, drop_boilerplate=True):
    """One document through the text filters, each optional:
    normalize: 'NFC'/'NFKC' Unicode normal form ('' = off);
    strip_control: \r\n -> \n, then C0/C1 control characters (but \t \n) and BOMs removed;
    drop_boilerplate: lines with a BOILERPLATE_PHRASES phrase, or that are a BOILERPLATE_LINES
    placeholder, are dropped.
    Lone surrogates, which UTF-8 cannot hold, always become U+FFFD.
    Returns (text, {'normalized': 0|1, 'control_chars': n, 'boilerplate_lines': n})."""
    counts = {'normalized': 0, 'control_chars': 0, 'boilerplate_lines': 0}
    try:
        text.encode('utf-8')
    except UnicodeEncodeError:  # lone surrogates (from JSON escapes) cannot be written as UTF-8
        text = text.encode('utf-8', 'surrogatepass').decode('utf-8', 'replace')
    if normalize and not unicodedata.is_normalized(normalize, text):
        text, counts['normalized'] = unicodedata.normalize(normalize, text), 1
    if strip_control:
        text = text.replace('\r\n', '\n').replace('\r', '\n')
        text, counts['control_chars'] = _CONTROL.subn('', text)
    if drop_boilerplate:
        spans = boilerplate_lines(text)
        if spans:
            keep, last = [], 0
            for start, end in spans:
                keep.append(text[last:start])
                last = end
            text, counts['boilerplate_lines'] = ''.join(keep) + text[last:], len(spans)
    return text, counts


def exact_key(text):
    """64-bit content hash: exact duplicates share it (and it orders documents for the split)."""
    return int.from_bytes(hashlib.blake2b(text.encode('utf-8', 'surrogatepass'), digest_size=8).digest(), 'little')


_P = 0x100000001B3  # odd, so it has an inverse mod 2^64
_powers_cache = [np.ones(1, np.uint64), np.ones(1, np.uint64)]


def _powers(n):
    """(P^i, P^-i) mod 2^64 for i < n."""
    if len(_powers_cache[0]) < n:
        m = max(n, 2 * len(_powers_cache[0]))
        for k, base in enumerate((_P, pow(_P, -1, 2 ** 64))):
            p = np.full(m, base, np.uint64)
            p[0] = 1
            _powers_cache[k] = np.cumprod(p)  # wraps mod 2^64, as wanted
    return _powers_cache[0][:n], _powers_cache[1][:n]


def _mix64(h):
    h = h ^ (h >> np.uint64(29))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    return h ^ (h >> np.uint64(32))


# How minhash_signatures splits text into tokens. Chinese, Japanese, Thai, Lao, Khmer, Myanmar and
# Tibetan put no spaces between words: read as "words", a run of their letters was a clause or a whole
# document, one shingle, and two copies differing in one character shared nothing (similarity 0.0).
# Each of their characters is a token instead. This is decided per run of characters, not per
# document: a Chinese text quoting English (or the reverse) is shingled by what each stretch is, and
# no document sits on a cut-off where a few more foreign words would switch its whole shingle set
# (and leave an edited copy of it nothing in common with it).
# A Han character or a kana is a syllable (in Chinese a morpheme), and 3 make a shingle: a Chinese
# document with 1-3% of its characters changed keeps a Jaccard similarity of 0.94-0.84 over character
# 3-grams and is caught at threshold 0.8, while over 5-grams a 3% edit falls to 0.75. Thai, Lao, Khmer,
# Myanmar and Tibetan are alphabets of a few dozen letters and marks, whose 3-grams unrelated texts
# share: there a letter weighs as much as a word, and 5 make a shingle.
# Below: (first code point, class) of consecutive ranges above ASCII. 0 separator (spaces,
# punctuation); 1 letter of a spaced script (Latin, Greek, Cyrillic, Hangul, Arabic, ...: runs of them
# are words); 2 Han, kana, Bopomofo, Yi; 3 Thai, Lao, Tibetan, Myanmar, Khmer.
_SCRIPT_RANGES = np.array([
    (0x0080, 0), (0x00AA, 1),  # C1 controls, no-break space, Latin-1 punctuation (¡ « ¿ ...; ª µ º stay letters)
    (0x00AB, 0), (0x00AC, 1), (0x00BB, 0), (0x00BC, 1), (0x00BF, 0), (0x00C0, 1),
    (0x0E00, 3), (0x10A0, 1),  # Thai, Lao, Tibetan, Myanmar
    (0x1780, 3), (0x1800, 1), (0x19E0, 3), (0x1A00, 1),  # Khmer, Khmer symbols
    (0x2000, 0), (0x2070, 1),  # general punctuation: spaces, dashes, quotes, ellipsis
    (0x2E80, 2), (0x2FE0, 1),  # CJK and Kangxi radicals
    (0x3000, 0), (0x3005, 2), (0x3008, 0), (0x3021, 2), (0x3030, 0), (0x3031, 2),  # CJK punctuation; 々〆〇 letters
    (0x3040, 2), (0x3130, 1), (0x3190, 2), (0xA4D0, 1),  # kana, Bopomofo (not Hangul jamo), CJK ideographs, Yi
    (0xF900, 2), (0xFB00, 1),  # CJK compatibility ideographs
    (0xFF00, 0), (0xFF10, 1), (0xFF1A, 0), (0xFF21, 1), (0xFF3B, 0), (0xFF41, 1),  # fullwidth punctuation
    (0xFF5B, 0), (0xFF66, 2), (0xFFA0, 1),  # ... halfwidth katakana
    (0x20000, 2), (0x40000, 1),  # CJK ideographs, extensions B to J
], np.int64)
_ASCII_CLASS = np.array([1 if chr(c).isalnum() or c == 95 else 0 for c in range(128)], np.uint8)


def script_classes(cp):
    """Code points (N,) int64 -> class of each (N,) uint8, as in _SCRIPT_RANGES: 0 separator,
    1 letter of a word, 2 Han/kana, 3 Thai/Lao/Khmer/Myanmar/Tibetan letter."""
    cls = _ASCII_CLASS[np.minimum(cp, 127)]
    high = np.flatnonzero(cp >= 128)  # the few non-ASCII code points of most text: classify only them
    if len(high):
        at = np.searchsorted(_SCRIPT_RANGES[:, 0], cp[high], side='right') - 1
        cls[high] = _SCRIPT_RANGES[at, 1]
    return cls


def minhash_signatures(texts, num_perm=64, ngram=5, seed=0, char_ngram=3):
    """MinHash (Broder 1997) of each text's set of shingles, all texts in one set of numpy
    passes: (signatures (len(texts), num_perm) uint32, has_words bool array).

    Tokens of the lower-cased text (see _SCRIPT_RANGES): a word is a run of letters and digits of
    a spaced script (ASCII [0-9a-z_], Latin, Cyrillic, Hangul, ...); each character of a script
    written without spaces is a token of its own. A shingle is `ngram` words (or Thai, ... letters)
    or `char_ngram` Han/kana characters: a word weighs char_ngram, a Han/kana character ngram, and a
    shingle is the shortest run of tokens from its first that weighs ngram * char_ngram, so mixed
    text gets both kinds (English only: exactly word 5-grams). Shingles never cross documents; a
    text lighter than one shingle has one shingle of all its tokens. A token's hash is the
    polynomial sum c_j P^(j-start) over its code points, a shingle's a polynomial over its tokens'
    hashes, each read off a running sum. The fraction of equal signature entries of two texts
    estimates the Jaccard similarity of their shingle sets."""
    # 1) code points and their classes; documents joined by '\n', a separator
    lowered = [t.lower() for t in texts]
    doc_start = np.cumsum([0] + [len(t) + 1 for t in lowered])[:-1]
    cp = np.frombuffer('\n'.join(lowered).encode('utf-32-le', 'surrogatepass'), np.uint32).astype(np.int64)
    sigs = np.full((len(texts), num_perm), np.iinfo(np.uint32).max, np.uint32)
    cls = script_classes(cp)
    # 2) tokens: runs of class 1, and each code point of class 2 or 3
    word, single = cls == 1, cls >= 2
    prev = np.concatenate(([False], word[:-1]))
    nxt = np.concatenate((word[1:], [False]))
    starts = np.flatnonzero((word & ~prev) | single)  # (T,) in text order
    if len(starts) == 0:
        return sigs, np.zeros(len(texts), bool)
    is_word = word[starts]
    ends = starts + 1
    ends[is_word] = np.flatnonzero(word & ~nxt) + 1
    T = len(starts)
    pw, inv = _powers(max(len(cp), T + ngram) + 1)
    contribution = np.where(cls > 0, cp.astype(np.uint64) * pw[:len(cp)], 0)  # c_j P^j on token code points
    running = np.concatenate((np.zeros(1, np.uint64), np.cumsum(contribution, dtype=np.uint64)))
    tokens = _mix64((running[ends] - running[starts]) * inv[starts])  # (T,) hash of each token
    doc = np.searchsorted(doc_start, starts, side='right') - 1  # (T,) document of each token
    n_tokens = np.bincount(doc, minlength=len(texts))
    # 3) shingles: token i to the first token j at which the weight reaches ngram * char_ngram
    weight = np.cumsum(np.concatenate(([0], np.where(cls[starts] == 2, ngram, char_ngram))))  # (T+1,)
    stop = np.searchsorted(weight, weight[:-1] + ngram * char_ngram)  # (T,) one past the shingle's last token
    valid = stop <= T
    valid[valid] = doc[stop[valid] - 1] == doc[valid]  # shingles never cross documents
    first = np.concatenate(([True], doc[1:] != doc[:-1]))  # a document lighter than one shingle: all of it
    last = np.searchsorted(doc, doc, side='right')  # (T,) one past the document's last token
    light = first & (weight[last] - weight[:-1] < ngram * char_ngram)
    stop = np.where(light, last, np.minimum(stop, T))
    valid |= light
    # a shingle's hash: sum of token_k P^(i + ngram - 1 - k) over its tokens k = i..stop-1, which for
    # text of ASCII words is the word 5-gram hash of earlier versions bit for bit (same signatures)
    running = np.concatenate((np.zeros(1, np.uint64), np.cumsum(tokens * inv[:T], dtype=np.uint64)))
    i = np.flatnonzero(valid)
    x = _mix64((running[stop[i]] - running[i]) * pw[i + ngram - 1])
    x = ((x >> np.uint64(32)) ^ x).astype(np.uint32)  # (S,)
    # 4) the minimum of each permutation over each document's shingles
    sdoc = doc[i]
    group = np.flatnonzero(np.concatenate(([True], sdoc[1:] != sdoc[:-1])))
    rng = np.random.default_rng(seed)
    a = rng.integers(1, 2 ** 32, num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    c = rng.integers(0, 2 ** 32, num_perm, dtype=np.uint64).astype(np.uint32)
    for lo in range(0, num_perm, 16):  # 16 permutations at a time bounds memory to 16 x S
        h = a[lo:lo + 16, None] * x[None, :] + c[lo:lo + 16, None]  # (16, S), wraps mod 2^32
        h ^= h >> np.uint32(16)
        sigs[sdoc[group], lo:lo + 16] = np.minimum.reduceat(h, group, axis=1).T
    return sigs, n_tokens > 0


class HashIndex:
    """64-bit keys -> the value first stored with each (an int >= 0). New keys wait in a dict and
    are merged into sorted numpy arrays every `batch` keys: 16 bytes a key instead of the ~100 a
    Python dict or set spends, so the dedup state of millions of documents stays small."""

    def __init__(self, batch=1 << 19):
        self.keys, self.values = np.zeros(0, np.uint64), np.zeros(0, np.int64)
        self.recent, self.batch = {}, batch

    def __len__(self):
        return len(self.keys) + len(self.recent)

    def get(self, keys):
        """The value of each of keys (a uint64 array), -1 where it has none."""
        keys = np.asarray(keys, np.uint64)
        out = np.full(len(keys), -1, np.int64)
        if len(self.keys):
            at = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            hit = self.keys[at] == keys
            out[hit] = self.values[at[hit]]
        if self.recent:
            for i, key in enumerate(keys.tolist()):
                out[i] = self.recent.get(key, out[i])
        return out

    def add(self, keys, value):
        """Store value with each of keys that has none yet (dict.setdefault)."""
        keys = np.asarray(keys, np.uint64)
        for key, old in zip(keys.tolist(), self.get(keys).tolist()):
            if old < 0:
                self.recent[key] = value
        if len(self.recent) >= self.batch:
            self._merge()

    def add_many(self, keys, values):
        """add(key, value) for each pair in order, vectorised (to rebuild an index from its journal)."""
        self._merge()
        keys, first = np.unique(np.asarray(keys, np.uint64), return_index=True)  # the first value of a key wins
        new = self.get(keys) < 0
        self._insert(keys[new], np.asarray(values, np.int64)[first][new])

    def _merge(self):
        if self.recent:
            keys = np.fromiter(self.recent.keys(), np.uint64, len(self.recent))
            values = np.fromiter(self.recent.values(), np.int64, len(self.recent))
            self.recent = {}
            order = np.argsort(keys)
            self._insert(keys[order], values[order])

    def _insert(self, keys, values):  # keys sorted, none present
        at = np.searchsorted(self.keys, keys)
        self.keys, self.values = np.insert(self.keys, at, keys), np.insert(self.values, at, values)


def band_rows(threshold, num_perm=64):
    """Rows per LSH band: the largest divisor of num_perm that still finds a pair at the threshold
    with probability >= 99%: 1 - (1 - t^r)^(num_perm/r)."""
    rows = [r for r in range(1, num_perm + 1) if num_perm % r == 0 and
            1 - (1 - threshold ** r) ** (num_perm // r) >= 0.99]
    return max(rows or [1])


def band_keys(sigs, rows):
    """(n, num_perm) MinHash signatures -> (n, num_perm // rows) uint64: a hash of each band of
    rows values, the band's number mixed in (equal values in two bands are two keys)."""
    n, bands = len(sigs), sigs.shape[1] // rows
    values = sigs[:, :bands * rows].reshape(n, bands, rows).astype(np.uint64)
    h = np.tile(np.arange(1, bands + 1, dtype=np.uint64), (n, 1))
    for j in range(rows):
        h = _mix64(h * np.uint64(_P) + values[:, :, j])
    return h


class NearDuplicates:
    """MinHash LSH: a document is a near-duplicate when some earlier kept document agrees on at
    least `threshold` of the signature (estimated Jaccard of the sets of shingles: word 5-grams,
    and character 3-grams in scripts without spaces; see minhash_signatures). Signatures are
    split into bands of band_rows(threshold) rows; the first kept document with a band is that
    band's candidate, and candidates are compared whole. Memory per kept document: its signature
    (num_perm x 4 bytes) and its bands in a HashIndex (16 bytes each): ~0.5 KB at the defaults.
    journal: a binary file that each kept signature is appended to (restore() reads it back)."""

    CHUNK = 4096  # signatures are stored in blocks of this many rows: no copying as they grow

    def __init__(self, threshold=0.8, num_perm=64, ngram=5, seed=0, char_ngram=3):
        self.threshold, self.num_perm, self.ngram, self.seed = threshold, num_perm, ngram, seed
        self.char_ngram = char_ngram
        self.rows = band_rows(threshold, num_perm)
        self.index = HashIndex()
        self.blocks, self.n_kept, self.journal = [], 0, None

    def keep(self, texts):
        """For each text (in order): True to keep it, False when it near-duplicates a kept one."""
        sigs, has_words = minhash_signatures(texts, self.num_perm, self.ngram, self.seed, self.char_ngram)
        return [self.keep_one(sig, ok, keys) for sig, ok, keys in zip(sigs, has_words, band_keys(sigs, self.rows))]

    def keep_one(self, sig, has_words, keys):
        """One document's verdict from its signature and band_keys: True (kept, and indexed) or
        False (a near-duplicate). A document without words has nothing to compare: kept."""
        if not has_words:
            return True
        candidates = self.index.get(keys)
        for c in set(candidates[candidates >= 0].tolist()):
            if np.mean(self.blocks[c // self.CHUNK][c % self.CHUNK] == sig) >= self.threshold:
                return False
        self.index.add(keys, self.n_kept)
        self._store(sig[None])
        if self.journal is not None:
            self.journal.write(np.ascontiguousarray(sig, np.uint32).tobytes())
        return True

    def restore(self, sigs):
        """Index the kept signatures (n, num_perm) of an interrupted run again, as keep_one did."""
        first = self.n_kept
        self._store(sigs)
        self.index.add_many(band_keys(sigs, self.rows).ravel(), np.repeat(np.arange(first, self.n_kept), sigs.shape[1] // self.rows))

    def _store(self, sigs):
        for sig in sigs:
            if self.n_kept % self.CHUNK == 0:
                self.blocks.append(np.zeros((self.CHUNK, self.num_perm), np.uint32))
            self.blocks[-1][self.n_kept % self.CHUNK] = sig
            self.n_kept += 1


DROP_REASONS = ('too_short', 'too_long', 'exact_duplicate', 'near_duplicate')
STAT_COLUMNS = ('chars_in', 'chars_out', 'normalized', 'control_chars', 'boilerplate_lines')  # clean_task's stats


def clean_task(settings, texts, tag=None):
    """The cleaning work of a batch of texts (documents or pieces of one), done by a pool worker
    while the main process reads and decides; nothing here depends on other batches, so any
    number of workers gives the same result. settings: Cleaner.settings. Returns (tag, the
    cleaned texts as UTF-8, stats (n, len(STAT_COLUMNS)) int64, exact keys (n,) uint64, and with
    minhash: signatures (n, 64) uint32, has_words (n,) bool, band_keys (n, bands) uint64)."""
    cleaned, stats = [], np.zeros((len(texts), len(STAT_COLUMNS)), np.int64)
    for i, text in enumerate(texts):
        out, c = clean_text(text, settings['normalize'], settings['strip_control'], settings['drop_boilerplate'])
        cleaned.append(out)
        stats[i] = len(text), len(out), c['normalized'], c['control_chars'], c['boilerplate_lines']
    raw = [t.encode('utf-8') for t in cleaned]  # clean_text leaves no lone surrogates
    keys = np.array([int.from_bytes(hashlib.blake2b(r, digest_size=8).digest(), 'little') for r in raw], np.uint64)
    if not settings['minhash']:
        return tag, raw, stats, keys, None, None, None
    sigs, has_words = minhash_signatures(cleaned, seed=settings['seed'])
    return tag, raw, stats, keys, sigs, has_words, band_keys(sigs, settings['band_rows'])


class Cleaner:
    """The cleaning steps in order, with the state that spans sources (hashes seen, the MinHash
    index): text filters (clean_text, in clean_task), then length, exact and near-duplicate checks
    (admit), which drop whole documents. The first copy of a duplicate is kept.
    journal: a binary file that each exact key added is appended to (restore() reads it back)."""

    def __init__(self, normalize='NFC', strip_control=True, drop_boilerplate=True, min_chars=0, max_chars=0,
                 exact_dedup=True, near_dedup=True, near_dedup_threshold=0.8, seed=0, batch_chars=1 << 20):
        self.settings = {'normalize': normalize, 'strip_control': strip_control, 'drop_boilerplate': drop_boilerplate,
                         'minhash': near_dedup, 'seed': seed, 'band_rows': band_rows(near_dedup_threshold)}
        self.min_chars, self.max_chars = min_chars, max_chars
        self.seen = HashIndex() if exact_dedup else None
        self.near = NearDuplicates(near_dedup_threshold, seed=seed) if near_dedup else None
        self.batch_chars = batch_chars  # run(): MinHash runs on batches of about this much text
        self.journal = None

    @staticmethod
    def new_counts():
        return {'docs_in': 0, 'docs_out': 0, 'chars_in': 0, 'chars_out': 0, 'dropped': dict.fromkeys(DROP_REASONS, 0),
                'normalized': 0, 'control_chars': 0, 'boilerplate_lines': 0, 'bad_lines': 0}

    def admit(self, n_chars, key, sig=None, has_words=False, keys=None):
        """The whole-document checks of a cleaned document, in order: length, exact copy, near
        copy (sig, has_words, keys: its MinHash signature, whether it has words, its band_keys).
        Returns the reason (DROP_REASONS) it is dropped for, or None when it is kept."""
        if n_chars < self.min_chars:
            return 'too_short'
        if 0 < self.max_chars < n_chars:
            return 'too_long'
        if self.seen is not None:
            key = np.array([key], np.uint64)
            if self.seen.get(key)[0] >= 0:
                return 'exact_duplicate'
            self.seen.add(key, 0)
            if self.journal is not None:
                self.journal.write(key.tobytes())
        if self.near is not None and not self.near.keep_one(sig, has_words, keys):
            return 'near_duplicate'
        return None

    def restore(self, keys, sigs):
        """The dedup state of an interrupted run, from its journals: exact keys and kept signatures."""
        if self.seen is not None:
            self.seen.add_many(keys, np.zeros(len(keys), np.int64))
        if self.near is not None:
            self.near.restore(sigs)

    def run(self, texts, counts):
        """Yield (text, exact_key) for each document kept, adding to counts (from new_counts): all
        of it in this process (prepare.py spreads clean_task over a pool instead)."""
        batch, size = [], 0
        for text in texts:
            batch.append(text)
            size += len(text)
            if size >= self.batch_chars:
                yield from self._run_batch(batch, counts)
                batch, size = [], 0
        yield from self._run_batch(batch, counts)

    def _run_batch(self, texts, counts):
        _, raw, stats, keys, sigs, has_words, bands = clean_task(self.settings, texts)
        for i in range(len(texts)):
            add_counts(counts, stats[i])
            minhash = (sigs[i], has_words[i], bands[i]) if sigs is not None else ()
            reason = self.admit(stats[i, 1], keys[i], *minhash)
            if reason:
                counts['dropped'][reason] += 1
                continue
            counts['docs_out'] += 1
            counts['chars_out'] += int(stats[i, 1])
            yield raw[i].decode('utf-8'), int(keys[i])


def add_counts(counts, stats):
    """A document's clean_task stats row into a source's counts (docs_in and the text filters)."""
    counts['docs_in'] += 1
    counts['chars_in'] += int(stats[0])
    for name, value in zip(STAT_COLUMNS[2:], stats[2:]):
        counts[name] += int(value)


# ----------------------------------------------------------------------------- mixing

def parse_sampling(dataset_sampling, sources):
    """Check a dataset_sampling dict {source: weight | {'weight', 'target_tokens', 'max_samples'}}
    against the sources; returns {source: {...}} with a rule (possibly empty) for every source."""
    if not isinstance(dataset_sampling, dict):
        raise SystemExit(f"dataset_sampling: expected a dict {{source: weight or {{...}}}}, got "
                         f"{type(dataset_sampling).__name__} {dataset_sampling!r}")
    rules = {s: {} for s in sources}
    for name, rule in dataset_sampling.items():
        field = f"dataset_sampling[{name!r}]"
        if name not in rules:
            raise SystemExit(f"dataset_sampling names {name!r}, which is not a source ({', '.join(sources)}); "
                             f"use the same text as in --sources")
        if _is_number(rule):
            rule = {'weight': rule}
        elif not isinstance(rule, dict):
            raise SystemExit(f"{field}: expected a number (the weight) or a dict with weight, target_tokens or "
                             f"max_samples, got {type(rule).__name__} {rule!r}")
        unknown = set(rule) - {'weight', 'target_tokens', 'max_samples'}
        if unknown:
            raise SystemExit(f"{field}: unknown key(s) {sorted(unknown)}; use weight, target_tokens or max_samples")
        if 'weight' in rule and 'target_tokens' in rule:
            raise SystemExit(f"{field}: give weight or target_tokens, not both")
        for key, v in rule.items():
            if not _is_number(v) or v < 0 or (key == 'max_samples' and v != int(v)):
                want = 'a whole number' if key == 'max_samples' else 'a number'
                raise SystemExit(f"{field}[{key!r}]: expected {want} >= 0, got {type(v).__name__} {v!r}")
        rules[name] = dict(rule)
    return rules


def _is_number(v):
    """A finite int or float, not a bool (True would pass for weight 1) nor a numeric string."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def mix_documents(doc_tokens, rules, seed=1337):
    """Choose training documents per source. doc_tokens: {source: token count of each train doc}.
    Rules (see parse_sampling):
      target_tokens  exactly this budget: a seeded shuffle, repeated (upsampled) when too small;
      weight         share of the mix over the weighted sources: the largest mix that needs no
                     repeats, each source a seeded random subset of weight/sum(weights) of it;
      none           every document once, in order.
    max_samples was applied before tokenising. Returns {source: array of document indices}."""
    rng = np.random.default_rng(seed)
    weighted = {s: r['weight'] for s, r in rules.items() if 'weight' in r}
    total_weight = sum(weighted.values())
    if weighted and total_weight <= 0:
        raise SystemExit("dataset_sampling weights sum to 0: give at least one source a weight > 0")
    empty = [s for s, w in weighted.items() if w > 0 and doc_tokens[s].sum() == 0]
    if empty:  # its share cannot be met by any mix: every weighted source would get nothing
        raise SystemExit(f"dataset_sampling gives {empty[0]!r} a weight, but it has no training documents left "
                         f"(cleaning dropped them all, or they went to val): drop its weight or fix the source")
    mix_size = min((doc_tokens[s].sum() / (w / total_weight) for s, w in weighted.items() if w > 0), default=0)
    chosen = {}
    for s, rule in rules.items():
        n = len(doc_tokens[s])
        if 'target_tokens' in rule or 'weight' in rule:
            budget = rule['target_tokens'] if 'target_tokens' in rule else mix_size * rule['weight'] / total_weight
            if 'weight' in rule:  # never more than the source: float rounding (10.000000000000002) would repeat a doc
                budget = min(budget, doc_tokens[s].sum())
            if n == 0 or budget <= 0:
                chosen[s] = np.zeros(0, np.int64)
                continue
            epochs = int(np.ceil(budget / max(1, doc_tokens[s].sum()))) + 1
            order = np.concatenate([rng.permutation(n) for _ in range(epochs)])
            cum = np.cumsum(doc_tokens[s][order])
            chosen[s] = order[:int(np.searchsorted(cum, budget)) + 1]  # stop once the budget is met
        else:
            chosen[s] = np.arange(n)
    return chosen


# ----------------------------------------------------------------------------- tokenising

def token_dtype(n_vocab):
    return np.uint16 if n_vocab < 2 ** 16 else np.uint32


def _encoder(tok):
    """text -> uint32 ids without special tokens, as fast as the tokenizer kind allows."""
    if tok.kind == 'char':
        table = np.full(0x110000, -1, np.int64)  # code point -> id, one vectorised lookup per text
        table[[ord(c) for c in tok.stoi]] = list(tok.stoi.values())

        def encode(text):
            ids = table[np.frombuffer(text.encode('utf-32-le', 'surrogatepass'), np.uint32)]
            if (ids < 0).any():
                missing = sorted({c for c in text if c not in tok.stoi})[:5]
                raise SystemExit(f"characters {missing} are not in the char tokenizer's vocabulary; "
                                 f"build the tokenizer from this text (--tokenizer_type=char)")
            return ids
        return encode
    # encode_to_numpy skips the Python list of ints that encode_ordinary builds, and releases the
    # GIL while it works: on threads it beats encode_ordinary_batch. allowed_special=set() and
    # disallowed_special=(): a '<|endoftext|>' inside a document is plain text, as in encode_batch.
    return lambda text: tok.enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())


def copy_documents(src, offsets, doc_ids, out, chunk_tokens=1 << 22):
    """Append documents doc_ids of the flat token array src (a memmap; offsets[i]:offsets[i+1] is
    document i) to the open file out, copying runs of consecutive documents in chunks."""
    doc_ids = np.asarray(doc_ids, np.int64)
    if len(doc_ids) == 0:
        return 0
    breaks = np.flatnonzero(np.diff(doc_ids) != 1) + 1
    written = 0
    for run in np.split(doc_ids, breaks):
        lo, hi = offsets[run[0]], offsets[run[-1] + 1]
        for a in range(lo, hi, chunk_tokens):
            out.write(np.ascontiguousarray(src[a:min(hi, a + chunk_tokens)]).tobytes())
        written += hi - lo
    return int(written)


def log_progress(what, done, total, t0, final=False):
    """One line: MB done of total, MB/s, ETA (or the time taken)."""
    elapsed = max(time.time() - t0, 1e-9)
    mb_s = done / 1e6 / elapsed
    when = f"done in {elapsed:.1f}s" if final else f"ETA {(total - done) / 1e6 / max(mb_s, 1e-9):.0f}s"
    print(f"{what} | {done / 1e6:.1f}/{total / 1e6:.1f} MB | {mb_s:.1f} MB/s | {when}")


def tokenise_spool(tok, spool, offsets, doc_ids, path, dtype, num_threads=0, chunk_bytes=16_000_000,
                   group_bytes=1 << 16, log_every=1.0):
    """The tokenising step. Documents doc_ids (ascending) of a text spool (UTF-8 bytes or an mmap;
    document i is spool[offsets[i]:offsets[i+1]]) are encoded, each prefixed by <|endoftext|>,
    cast to dtype and appended to the file at path. Runs of ~group_bytes are one task each on a
    pool of num_threads, kept busy without a barrier; at most ~chunk_bytes of text is in flight,
    so memory stays bounded whatever the corpus size. A progress line every log_every seconds.
    Returns the token count of each document (aligned with doc_ids)."""
    encode, eot = _encoder(tok), np.array([tok.eot_id], np.uint32)

    def encode_group(ids):  # on a worker thread; tiktoken releases the GIL while it encodes
        arrays = [encode(spool[offsets[i]:offsets[i + 1]].decode('utf-8')) for i in ids]
        tokens = np.concatenate([p for arr in arrays for p in (eot, arr)]).astype(dtype)
        return tokens, np.array([len(arr) + 1 for arr in arrays], np.int64)

    doc_ids = np.asarray(doc_ids, np.int64)
    doc_bytes = np.diff(offsets)[doc_ids]
    group_of = np.cumsum(doc_bytes) // max(1, int(group_bytes))
    groups = np.split(doc_ids, np.flatnonzero(np.diff(group_of)) + 1) if len(doc_ids) else []
    group_size = [int(b.sum()) for b in np.split(doc_bytes, np.flatnonzero(np.diff(group_of)) + 1)] if groups else []
    max_in_flight = max(2 * (num_threads or os.cpu_count() or 1), int(chunk_bytes // group_bytes))
    total, done, t0 = int(doc_bytes.sum()), 0, time.time()
    last_log, lengths, in_flight = t0, [], deque()
    with ThreadPoolExecutor(num_threads or os.cpu_count() or 1) as pool, open(path, 'wb') as f:
        for k, group in enumerate(groups + [None] * max_in_flight):  # the Nones drain the queue
            if group is not None:
                in_flight.append((pool.submit(encode_group, group), group_size[k]))
            if len(in_flight) >= max_in_flight or (group is None and in_flight):
                future, size = in_flight.popleft()
                tokens, n = future.result()
                f.write(tokens.tobytes())
                lengths.append(n)
                done += size
                if log_every and time.time() - last_log >= log_every and done < total:
                    log_progress('tokenise', done, total, t0)
                    last_log = time.time()
    if log_every:
        log_progress('tokenise', done, total, t0, final=True)
    return np.concatenate(lengths) if lengths else np.zeros(0, np.int64)


# ----------------------------------------------------------------------------- worker pools

def make_pool(num_proc):
    """num_proc worker processes (0 = one per core) for clean_task and tokenise_task, or None
    when that is 1: the work then runs in this process, with the same results. Forked, because
    prepare.py is a script, which a spawned worker would run again from its first line; where
    fork is missing (Windows) the work runs in this process."""
    n = num_proc or os.cpu_count() or 1
    if n <= 1:
        return None
    if 'fork' not in multiprocessing.get_all_start_methods():
        print(f"num_proc={n}: this platform cannot fork worker processes; running on one core")
        return None
    return multiprocessing.get_context('fork').Pool(n, initializer=signal.signal,
                                                    initargs=(signal.SIGINT, signal.SIG_IGN))  # Ctrl-C: the main's


def ordered_map(pool, fn, tasks, in_flight):
    """fn(*task) for each task, yielded in the tasks' order, so the output does not depend on the
    number of workers. At most in_flight tasks are out at once: memory stays bounded however many
    tasks there are (Pool.imap would read every task ahead, i.e. the whole corpus). While the
    workers run, the caller reads the next task and handles the previous result. pool None: inline."""
    if pool is None:
        for task in tasks:
            yield fn(*task)
        return
    pending = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, task))
        if len(pending) >= max(1, in_flight):
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


_worker_encoders = {}  # tokenizer.json path -> (encode, eot id), loaded once per worker


def tokenise_task(spool_path, tokenizer_path, dtype, bounds, doc_starts):
    """The tokenising work of consecutive pieces of the text spool (a pool worker's task): piece
    i is spool[bounds[i]:bounds[i+1]]; a piece that starts a document (doc_starts[i]) is prefixed
    by <|endoftext|>. Returns (tokens as bytes of dtype, token count of each piece)."""
    if tokenizer_path not in _worker_encoders:
        from tokenizer import Tokenizer  # here: tokenizer.py is not needed to read data
        tok = Tokenizer.load(tokenizer_path)
        _worker_encoders[tokenizer_path] = (_encoder(tok), np.array([tok.eot_id], np.uint32))
    encode, eot = _worker_encoders[tokenizer_path]
    with open(spool_path, 'rb') as f:
        f.seek(bounds[0])
        raw = f.read(bounds[-1] - bounds[0])
    parts, counts = [], np.zeros(len(doc_starts), np.int64)
    for i, starts in enumerate(doc_starts):
        try:
            ids = encode(raw[bounds[i] - bounds[0]:bounds[i + 1] - bounds[0]].decode('utf-8'))
        except SystemExit as e:  # a character a reused char tokenizer lacks: an error the main process can raise
            raise DataError(str(e)) from None
        parts += [eot, ids] if starts else [ids]
        counts[i] = len(ids) + bool(starts)
    tokens = np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return tokens.tobytes(), counts


# ----------------------------------------------------------------------------- token shards

def shard_name(split, k):
    return f'{split}_{k:06d}.bin'


def copy_ranges(src, starts, ends, out, itemsize, chunk_bytes=1 << 24):
    """Append the items src[a:b] for each (a, b) of starts, ends (in items of itemsize bytes) from
    the open binary file src to the open file out; ranges that follow each other are copied as
    one, in chunks of chunk_bytes. Read with seek/read, not a memory map: a map's pages count
    as the process's memory for as long as it is open."""
    starts, ends = np.asarray(starts, np.int64), np.asarray(ends, np.int64)
    if len(starts) == 0:
        return
    breaks = np.flatnonzero(starts[1:] != ends[:-1]) + 1  # runs of ranges that follow each other
    for a, b in zip(starts[np.r_[0, breaks]] * itemsize, ends[np.r_[breaks - 1, len(ends) - 1]] * itemsize):
        src.seek(a)
        while a < b:
            chunk = src.read(min(chunk_bytes, b - a))
            out.write(chunk)
            a += len(chunk)


def token_shards(folder, meta, split):
    """[(path, token count)] of a split of a prepared dataset, in order: the shards its meta.json
    lists (split_000000.bin, ...), or {split}.bin for a dataset prepared before shards. A missing
    shard, or one whose size is not its token count, is an error naming the file."""
    dtype = np.dtype(meta['dtype'])
    if 'shards' in meta:
        listed = [(s['file'], s['tokens']) for s in meta['shards'][split]]
    else:
        listed = [(f'{split}.bin', meta.get(f'{split}_tokens'))]
    shards = []
    for k, (name, tokens) in enumerate(listed):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise SystemExit(f"{path} is missing ({split} shard {k + 1} of {len(listed)} listed in "
                             f"{os.path.join(folder, 'meta.json')}): run prepare.py again")
        size = os.path.getsize(path)
        if tokens is None:
            tokens = size // dtype.itemsize
        if size != tokens * dtype.itemsize:
            raise SystemExit(f"{path} has {size:,} bytes, but meta.json says {tokens:,} {dtype.name} tokens "
                             f"({tokens * dtype.itemsize:,} bytes): the file is corrupt or cut short; "
                             f"run prepare.py again")
        shards.append((path, tokens))
    return shards
