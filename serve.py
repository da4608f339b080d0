"""
An OpenAI-compatible HTTP server over our generator and KV cache, and a web chat page.

    python serve.py --out_dir=out-sft                        # then open http://127.0.0.1:8000/
    python serve.py --out_dir=hf:qwen2.5-0.5b --dtype=bfloat16 --context=4096 --max_batch=32
    curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
        -d '{"model": "out-sft", "messages": [{"role": "user", "content": "What is 12+30?"}]}'

    from openai import OpenAI                                 # or any OpenAI-compatible client
    client = OpenAI(base_url='http://127.0.0.1:8000/v1', api_key='x')
    client.chat.completions.create(model='out-sft', messages=[...], stream=True)

Endpoints: POST /v1/chat/completions (messages), POST /v1/completions (prompt), GET /v1/models,
GET /health (the engine's counters), GET / (chat.html, the chat page). Requests take max_tokens,
temperature, top_p, top_k, min_p, stop, n, seed, stream (server-sent events, OpenAI's chunks),
stream_options.include_usage and vLLM's ignore_eos; a bad one gets OpenAI's error JSON with a 4xx
status and the field (`param`) at fault.

Batching is continuous, step by step (Orca, Yu et al. 2022; vLLM). One engine thread owns the model
and a KV cache of max_batch slots x context positions (a thread, not an asyncio task: a forward would
stall the event loop, and torch lets go of the GIL in its kernels); request handlers only queue work
and await their tokens. Every step the engine
    1) frees the slots of rows whose client has gone,
    2) admits waiting requests into free slots (one prefill for all of them; n choices of a prompt
       share its prefill),
    3) samples one token for every running row, and sends each row's new text to its client,
    4) frees the slots of finished rows, and runs one decode step for the rest.
So a request that arrives while others decode joins them at the next step (one step is one token:
milliseconds), not after the running batch has finished, and a finished row's slot takes a new
request at once. What makes this cheap: every slot has its own length. A row's keys sit at columns
0..len-1 of its slot and a key mask hides the rest, so rows of any age share a decode step with no
padding and no copying; the running rows stay in slots 0..B-1 (a finished row's slot is filled by
moving the last row into it), so a step reads the cache as it is, without gathering.
"""

import asyncio
import json
import math
import os
import socket
import threading
import time
import traceback
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch

try:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException
except ImportError as e:
    raise SystemExit(f"serve.py needs FastAPI and uvicorn ({e}): pip install fastapi uvicorn") from None

from common import checkpoint_path, inference_precision, load_checkpoint, model_from_checkpoint, tokenizer_from_checkpoint
from configurator import configure
from generate import GenerationConfig, TextStream, mask_padded_ids, sample_token

# -----------------------------------------------------------------------------
# checkpoint
out_dir = 'out'  # a run's folder (its best.pt, else ckpt.pt), a .pt file, or hf:PATH (a transformers model)
model_name = ''  # the model name clients send; '' = the last part of out_dir
# server
host = '127.0.0.1'  # '0.0.0.0' serves other machines too: there is no authentication
port = 8000  # 0 = any free port (the "serving" line says which)
log_level = 'warning'  # uvicorn's: 'info' logs every request
# engine
max_batch = 16  # KV-cache slots = rows decoded together; a request takes n slots per prompt
context = 0  # positions per slot (prompt + completion); 0 = the model's block_size. The cache holds
             # max_batch x context keys and values per layer: lower it for models with long contexts
max_prefill_tokens = 4096  # padded prompt tokens per prefill: a step that admits requests pauses the
                           # running rows for one prefill, and this bounds it (a longer prompt goes alone)
system = ''  # a system message for conversations that bring none
seed = 1337  # the random stream of requests without a seed of their own
log_interval = 10.0  # seconds between the engine's log lines while it works; 0 = never
# system
device = 'auto'  # 'cpu' | 'cuda' | 'cuda:1' | 'mps'; auto picks the best available
dtype = 'auto'  # 'float32' | 'bfloat16' | 'float16'; auto = bf16 on GPUs that support it, else fp32
compile_model = False  # torch.compile the decode step: a slow first request, faster decoding after
# -----------------------------------------------------------------------------
config = configure(globals())  # overrides from the command line or a config file
# -----------------------------------------------------------------------------

device, ptdtype = inference_precision(device, dtype)  # 'auto': the best device, bf16 on GPUs that have it
if max_batch < 1:
    raise SystemExit(f"max_batch={max_batch}: at least one slot is needed")
torch.manual_seed(seed)

# the checkpoint: the model and tokenizer it describes
ckpt = load_checkpoint(out_dir)
ckpt_path = checkpoint_path(out_dir)
try:
    model = model_from_checkpoint(ckpt, dropout=0.0)
    tokenizer = tokenizer_from_checkpoint(ckpt)
except (TypeError, ValueError, KeyError, AssertionError, RuntimeError) as e:
    detail = '\n  '.join(str(e).splitlines()[:6])
    raise SystemExit(f"{ckpt_path}: cannot build its model and tokenizer with this version of the code:\n"
                     f"  {detail}") from None
if tokenizer.n_vocab > model.config.vocab_size:
    raise SystemExit(f"{ckpt_path}: the tokenizer has {tokenizer.n_vocab} tokens but the model only "
                     f"{model.config.vocab_size}: this model and tokenizer do not belong together")
context = context or model.config.block_size
if not 2 <= context <= model.config.block_size:
    raise SystemExit(f"context={context}: must be in 2..{model.config.block_size} (the model's block_size)")
model.to(device=device, dtype=ptdtype).eval()
model_name = model_name or os.path.basename(os.path.normpath(out_dir.removeprefix('hf:')))
del ckpt  # the weights now live in the model
STOP_IDS = (tokenizer.eot_id, tokenizer.im_end_id)  # end of document, end of turn (TextGenerator's stops)
SPECIAL_IDS = set(tokenizer.special_tokens.values())  # not text: left out of replies


# ----------------------------------------------------------------------------- the engine

class SlotCache:
    """The batch's KV cache: (n_layer, slots, n_kv_head, context, head_dim) keys and values, each slot
    with its own length. GPT.forward uses a cache through `pos` (where this call's keys go, for all
    rows) and update(); here `pos` is 0 at every call (the caller passes positions and masks) and update() writes
    where the last prefill_into()/decode_into() said:
        prefill: slots r0..r1-1 at columns 0..T-1 (right-padded prompts; causal attention)
        decode:  slots 0..B-1, one key each at its own column `at` (B,), attending to columns 0..width-1"""

    def __init__(self, config, slots, context, device, dtype):
        shape = (config.n_layer, slots, config.n_kv_head, context, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.pos, self.rows, self.at, self.width = 0, slice(0, 0), None, 0
        self.slot = None  # not model.KVCache's static mode: update() returns the columns in use

    def prefill_into(self, r0, r1):
        self.pos, self.rows, self.at = 0, slice(r0, r1), None

    def decode_into(self, at, width):
        self.pos, self.rows, self.at, self.width = 0, torch.arange(at.size(0), device=at.device), at, width

    def update(self, layer, k, v):
        """This call's keys/values (B, nkv, T, hs) -> all the keys/values its queries see."""
        if self.at is None:
            T = k.size(2)
            self.k[layer, self.rows, :, :T], self.v[layer, self.rows, :, :T] = k, v
            return self.k[layer, self.rows, :, :T], self.v[layer, self.rows, :, :T]
        self.k[layer, self.rows, :, self.at] = k[:, :, 0]  # row b's key at its column at[b]
        self.v[layer, self.rows, :, self.at] = v[:, :, 0]
        B = k.size(0)
        return self.k[layer, :B, :, :self.width], self.v[layer, :B, :, :self.width]  # (B, nkv, width, hs)

    def copy(self, src, dst, length):
        """Slot dst takes slot src's first `length` keys/values."""
        self.k[:, dst, :, :length] = self.k[:, src, :, :length]
        self.v[:, dst, :, :length] = self.v[:, src, :, :length]


class Job:
    """One request, as the engine sees it: prompts (lists of ids), n choices of each, the sampling
    options. Made by a handler on the event loop; the engine thread reports back through post():
    lists of ('text', choice, piece, finish_reason or None, completion tokens) or ('error', message)."""

    def __init__(self, prompts, n, options, loop):
        self.prompts, self.n, self.options, self.loop = prompts, n, options, loop
        self.events = asyncio.Queue()
        self.cancelled = False  # set by the handler when its client has gone; the engine frees the slots
        self.draws = [Draws(options.seed) for _ in prompts]  # each prompt's n choices share a random stream

    def post(self, events):
        post_all([(self, events)])


def post_all(batch):
    """[(job, events)] -> each job's queue, in one call into the event loop (one wake-up per step)."""
    def deliver():
        for job, events in batch:
            job.events.put_nowait(events)
    if batch:
        try:
            batch[0][0].loop.call_soon_threadsafe(deliver)  # one event loop serves every job
        except RuntimeError:  # the event loop has closed: the server is shutting down
            pass


class Draws:
    """The uniform numbers of a prompt's n choices: n per step from one stream (seeded, or torch's
    global one), as generate.decode_steps draws them for n copies of a prompt, so a seeded request
    samples what TextGenerator samples with that seed, whatever else the engine is running."""

    def __init__(self, seed):
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.step, self.numbers = -1, None

    def get(self, step, n, choice):
        if step != self.step:  # the first of the choices to ask this step draws for all
            self.step, self.numbers = step, torch.rand(n, generator=self.generator, device=device)
        return self.numbers[choice:choice + 1]


@dataclass
class Row:
    """One choice of a job, generated in one cache slot."""
    job: Job
    prompt: int       # which of the job's prompts
    choice: int       # its index in the response: prompt * n + copy
    length: int       # tokens in its slot
    text: TextStream
    generated: int = 0


@dataclass
class Stats:
    requests: int = 0            # jobs admitted
    cancelled: int = 0           # rows freed because their client went away
    steps: int = 0               # decode steps
    tokens: int = 0              # tokens sampled
    prefill_tokens: int = 0      # prompt tokens prefilled
    max_batch_seen: int = 0      # the most rows ever sampled in one step
    errors: int = 0              # steps that failed (their requests got an error)
    since: float = field(default_factory=time.perf_counter)  # start of the current log interval
    tokens_since: int = 0


class Engine:
    """The model's owner: a thread that runs steps while there is work (see the module docstring)."""

    def __init__(self, model, slots, context, step_fn=None):
        self.model, self.slots, self.context = model, slots, context
        self.step_fn = model if step_fn is None else step_fn
        self.cache = SlotCache(model.config, slots, context, device, model.lm_head.weight.dtype)
        self.rows = []         # running rows; rows[i] lives in cache slot i
        self.logits = None     # (len(rows), V): each row's next-token logits
        self.waiting = deque()  # jobs not yet admitted
        self.admitted = []     # jobs admitted in the step under way (failed with it, if it fails)
        self.lock = threading.Condition()
        self.stats = Stats()
        self.samples = 0       # sample() calls: a step's id for the random draws

    def submit(self, job):
        with self.lock:
            self.waiting.append(job)
            self.lock.notify()

    def wake(self):
        """A job was cancelled: let an idle engine drop it from the queue."""
        with self.lock:
            self.lock.notify()

    def counters(self):
        with self.lock:
            waiting = sum(not j.cancelled for j in self.waiting)
        s = self.stats
        return dict(running=len(self.rows), waiting=waiting, slots=self.slots, context=self.context,
                    max_batch_seen=s.max_batch_seen, requests=s.requests, cancelled=s.cancelled, steps=s.steps,
                    tokens=s.tokens, prefill_tokens=s.prefill_tokens, errors=s.errors)

    def run(self):
        with torch.inference_mode():
            while True:
                with self.lock:
                    while not self.rows and not any(not j.cancelled for j in self.waiting):
                        self.waiting.clear()
                        self.lock.wait()
                try:
                    self.step()
                except Exception as e:  # out of memory, a bug: the requests of this step fail, the server lives
                    traceback.print_exc()
                    self.stats.errors += 1
                    jobs = {id(j): j for j in [r.job for r in self.rows] + self.admitted}
                    for job in jobs.values():
                        job.post([('error', f"the engine failed: {type(e).__name__}: {e}")])
                    self.rows, self.logits, self.admitted = [], None, []
                self.log()

    def step(self):
        # 1) rows whose client has gone free their slots
        if any(r.job.cancelled for r in self.rows):
            self.stats.cancelled += sum(r.job.cancelled for r in self.rows)
            self.retire([not r.job.cancelled for r in self.rows])
        # 2) waiting jobs take free slots: one prefill for all of them
        self.admitted = self.admit()
        if self.admitted:
            self.prefill(self.admitted)
            self.admitted = []
        if not self.rows:
            return
        # 3) one token for every running row; its text goes to its client
        tokens = self.sample()  # (B,)
        finished = self.emit(tokens.tolist())  # .tolist() is a host sync: the text needs the ids
        self.stats.max_batch_seen = max(self.stats.max_batch_seen, len(self.rows))
        self.stats.tokens += len(self.rows)
        self.stats.tokens_since += len(self.rows)
        # 4) finished rows free their slots; one decode step for the others
        order = self.retire([not f for f in finished])
        if self.rows:
            self.decode(tokens[torch.tensor(order, device=tokens.device)])
            self.stats.steps += 1

    def admit(self):
        """Waiting jobs, first come first served, while their rows fit the free slots and their prompts
        (right-padded) fit max_prefill_tokens; a job that would exceed it alone is admitted alone."""
        jobs, free, n_prompts, longest = [], self.slots - len(self.rows), 0, 0
        with self.lock:
            while self.waiting:
                job = self.waiting[0]
                if job.cancelled:
                    self.waiting.popleft()
                    continue
                need = len(job.prompts) * job.n
                T = max(longest, max(len(p) for p in job.prompts))
                if need > free or (jobs and (n_prompts + len(job.prompts)) * T > max_prefill_tokens):
                    break
                jobs.append(self.waiting.popleft())
                free, n_prompts, longest = free - need, n_prompts + len(job.prompts), T
        self.stats.requests += len(jobs)
        return jobs

    def prefill(self, jobs):
        """The jobs' prompts, right-padded into one batch, fill slots B..B+U-1 (U prompts) in one
        forward; their other n-1 choices copy the prompt's keys/values into slots of their own."""
        B = len(self.rows)
        prompts = [(job, p, ids) for job in jobs for p, ids in enumerate(job.prompts)]
        U, T = len(prompts), max(len(ids) for _, _, ids in prompts)
        dev = self.cache.k.device
        idx = torch.tensor([ids + [tokenizer.pad_id] * (T - len(ids)) for _, _, ids in prompts], device=dev)  # (U, T)
        last = torch.tensor([len(ids) - 1 for _, _, ids in prompts], device=dev)  # (U,)
        self.cache.prefill_into(B, B + U)
        # right padding is harmless under causal attention: a prompt's tokens never see the pads after
        # them, and the pads' keys lie past the row's length, masked until overwritten
        h, _ = self.model.hidden_states(idx, kv_cache=self.cache)  # (U, T, C)
        logits = self.model.lm_head(h[torch.arange(U, device=dev), last])  # (U, V): each prompt's last token
        firsts, copies, source = [], [], []
        for u, (job, p, ids) in enumerate(prompts):
            for c in range(job.n):
                row = Row(job, p, p * job.n + c, len(ids), TextStream(tokenizer, job.options.stop_strings, SPECIAL_IDS))
                (copies if c else firsts).append(row)
                if c:
                    source.append(u)
        for i, (row, u) in enumerate(zip(copies, source)):
            self.cache.copy(B + u, B + U + i, row.length)
        self.rows += firsts + copies
        new = torch.cat([logits, logits[source]]) if copies else logits
        self.logits = new if self.logits is None else torch.cat([self.logits, new])
        self.stats.prefill_tokens += sum(len(ids) for _, _, ids in prompts)

    def sample(self):
        """One token per running row (B,), each with its request's options: rows with the same options
        are sampled together (usually all of them)."""
        logits = mask_padded_ids(self.logits.float(), tokenizer.n_vocab)  # (B, V): never an id the tokenizer lacks
        groups = {}
        for i, row in enumerate(self.rows):
            o = row.job.options
            groups.setdefault((o.temperature, o.top_k, o.top_p, o.min_p), []).append(i)
        tokens = torch.empty(len(self.rows), dtype=torch.long, device=logits.device)
        self.samples += 1
        for (temperature, top_k, top_p, min_p), idx in groups.items():
            uniform = None
            if temperature:
                rows = [self.rows[i] for i in idx]
                uniform = torch.cat([r.job.draws[r.prompt].get(self.samples, r.job.n, r.choice % r.job.n)
                                     for r in rows])
            if len(groups) == 1:
                return sample_token(logits, temperature, top_k, top_p, min_p, uniform=uniform)
            index = torch.tensor(idx, device=logits.device)
            tokens[index] = sample_token(logits[index], temperature, top_k, top_p, min_p, uniform=uniform)
        return tokens

    def emit(self, tokens):
        """Each row's new token -> its text, and whether it ends the row: a stop token ('stop'), a
        completed stop string ('stop'), or max_tokens ('length'). One post for all jobs. Returns finished (B,)."""
        finished, events = [], {}
        for row, tok in zip(self.rows, tokens):
            o = row.job.options
            row.generated += 1
            if tok in o.stop_token_ids:
                piece, reason = '', 'stop'
            else:
                piece = row.text.push(tok)
                reason = 'stop' if row.text.stopped else 'length' if row.generated == o.max_new_tokens else None
            if reason:
                piece += row.text.finish()
            finished.append(reason is not None)
            if piece or reason:
                event = ('text', row.choice, piece, reason, row.generated)
                events.setdefault(id(row.job), (row.job, []))[1].append(event)
        post_all(list(events.values()))
        return finished

    def retire(self, keep):
        """Drop the rows not kept; the last kept rows move into the freed slots below len(kept), so the
        running rows stay in slots 0..B-1. Returns the kept rows' old indices in their new order."""
        n = sum(keep)
        order = list(range(n))
        movers = iter([i for i in range(n, len(keep)) if keep[i]])
        for hole in [i for i in range(n) if not keep[i]]:
            mover = next(movers)
            self.cache.copy(mover, hole, self.rows[mover].length)
            order[hole] = mover
        self.rows = [self.rows[i] for i in order]
        if self.logits is not None:
            self.logits = self.logits[torch.tensor(order, device=self.logits.device)] if n else None
        return order

    def decode(self, tokens):
        """Each row's new token (B,) goes into its slot at column = its length (= its position)."""
        lengths = [r.length for r in self.rows]
        width = max(lengths) + 1
        at = torch.tensor(lengths, device=tokens.device)  # (B,)
        key_mask = None  # rows of one length (one row, say) see every column: no mask, SDPA's fastest path
        if min(lengths) < width - 1:
            key_mask = torch.arange(width, device=tokens.device)[None, :] <= at[:, None]  # (B, width)
            key_mask = key_mask[:, None, None, :]  # (B, 1, 1, width): heads and the query broadcast
        self.cache.decode_into(at, width)
        logits, _ = self.step_fn(tokens[:, None], positions=at[:, None], attn_mask=key_mask,
                                 kv_cache=self.cache)  # (B, 1, V)
        self.logits = logits[:, -1]
        for r in self.rows:
            r.length += 1

    def log(self):
        s = self.stats
        dt = time.perf_counter() - s.since
        if log_interval and dt >= log_interval:
            if s.tokens_since:
                print(f"engine: {s.tokens_since / dt:.0f} tok/s over {dt:.0f}s, {len(self.rows)} running, "
                      f"{len(self.waiting)} waiting, max batch {s.max_batch_seen}, {s.requests} requests", flush=True)
            s.since, s.tokens_since = time.perf_counter(), 0


# ----------------------------------------------------------------------------- requests

class ApiError(Exception):
    """A refused request: OpenAI's error JSON, with the status and the field at fault (param)."""

    def __init__(self, status, message, param=None, code=None, kind='invalid_request_error'):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def json(self):
        return {'error': {'message': self.message, 'type': self.kind, 'param': self.param, 'code': self.code}}

    def response(self):
        return JSONResponse(self.json(), status_code=self.status)


def shown(x):
    return json.dumps(x)[:60]


def number(body, name, default, lo, hi, open_lo=False, open_hi=False):
    """body[name] as a float in [lo, hi] (open ends where asked), or default when absent/null."""
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not isinstance(x, (int, float)) or (isinstance(x, float) and not math.isfinite(x)):
        raise ApiError(400, f"{name} must be a number, not {shown(x)}", name, 'invalid_type')
    if x < lo or x > hi or (open_lo and x == lo) or (open_hi and x == hi):  # ints compare exactly, however large
        interval = f"{'(' if open_lo else '['}{lo}, {hi}{')' if open_hi else ']'}"
        raise ApiError(400, f"{name}={shown(x)} is out of range: it must be in {interval}", name, 'invalid_value')
    return float(x)


def integer(body, name, default, lo, hi=2 ** 63 - 1):
    """body[name] as an int in [lo, hi] (an integral float is accepted), or default when absent/null."""
    x = body.get(name)
    if x is None:
        return default
    if isinstance(x, bool) or not (isinstance(x, int) or (isinstance(x, float) and x.is_integer())):
        raise ApiError(400, f"{name} must be an integer, not {shown(x)}", name, 'invalid_type')
    if not lo <= x <= hi:
        raise ApiError(400, f"{name}={shown(x)} is out of range: it must be in [{lo}, {hi}]", name, 'invalid_value')
    return int(x)


def boolean(body, name, default=False):
    x = body.get(name)
    if x is None:
        return default
    if not isinstance(x, bool):
        raise ApiError(400, f"{name} must be true or false, not {shown(x)}", name, 'invalid_type')
    return x


# OpenAI fields this server does not implement, and the values that mean "off"
UNSUPPORTED = {'logprobs': (None, False, 0), 'top_logprobs': (None, 0), 'echo': (None, False), 'best_of': (None, 1),
               'suffix': (None, ''), 'logit_bias': (None, {}), 'tools': (None, []), 'functions': (None, []),
               'presence_penalty': (None, 0), 'frequency_penalty': (None, 0), 'tool_choice': (None, 'none', 'auto')}


@dataclass
class Options:
    generation: GenerationConfig
    n: int
    stream: bool
    include_usage: bool


def request_options(body, prompts, prompt_param):
    """The sampling options of a request whose prompts (ids) are given; errors name the field."""
    for name, off in UNSUPPORTED.items():
        if body.get(name) not in off:
            raise ApiError(400, f"{name} is not supported by this server", name, 'unsupported_parameter')
    fmt = body.get('response_format')
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get('type') == 'text'):
        raise ApiError(400, "response_format is not supported by this server (only {'type': 'text'})",
                       'response_format', 'unsupported_parameter')
    n = integer(body, 'n', 1, 1, max_batch)
    if n * len(prompts) > max_batch:
        raise ApiError(400, f"n={n} choices for {len(prompts)} prompts need {n * len(prompts)} slots; this server "
                       f"has max_batch={max_batch}", 'n', 'invalid_value')
    temperature = number(body, 'temperature', 1.0, 0, 2)
    top_p = number(body, 'top_p', 1.0, 0, 1, open_lo=True)
    top_k = max(integer(body, 'top_k', 0, -1), 0)  # vLLM's: -1 or 0 = off
    min_p = number(body, 'min_p', 0.0, 0, 1, open_hi=True)
    stop = body.get('stop')
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 16:
        raise ApiError(400, f"stop must be a string or a list of at most 16 strings, not {shown(body['stop'])}",
                       'stop', 'invalid_type')
    seed = integer(body, 'seed', None, -2 ** 63)
    ignore_eos = boolean(body, 'ignore_eos')  # vLLM's: generate max_tokens whatever comes (benchmarks)
    stream = boolean(body, 'stream')
    stream_options = body.get('stream_options') or {}
    if not isinstance(stream_options, dict):
        raise ApiError(400, f"stream_options must be an object, not {shown(stream_options)}", 'stream_options',
                       'invalid_type')
    include_usage = boolean(stream_options, 'include_usage')
    # the context: prompt + completion must fit a slot
    longest = max(len(p) for p in prompts)
    if longest >= context:
        raise ApiError(400, f"{prompt_param} is {longest} tokens long; this model's maximum context length is "
                       f"{context} tokens (prompt and completion): shorten it", prompt_param, 'context_length_exceeded')
    max_name = 'max_completion_tokens' if body.get('max_completion_tokens') is not None else 'max_tokens'
    max_tokens = integer(body, max_name, None, 1)
    if max_tokens is None:
        max_tokens = context - longest
    elif longest + max_tokens > context:
        raise ApiError(400, f"this model's maximum context length is {context} tokens; you asked for "
                       f"{longest + max_tokens} ({longest} in the prompt, {max_tokens} to generate): set {max_name} "
                       f"<= {context - longest} or shorten the prompt", max_name, 'context_length_exceeded')
    generation = GenerationConfig(max_new_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                  min_p=min_p, stop_token_ids=() if ignore_eos else STOP_IDS,
                                  stop_strings=tuple(stop), seed=seed)
    return Options(generation, n, stream, include_usage)


def check_model(body):
    name = body.get('model')
    if name is not None and not isinstance(name, str):
        raise ApiError(400, f"model must be a string, not {shown(name)}", 'model', 'invalid_type')
    if name is not None and name != model_name:
        raise ApiError(404, f"the model {name!r} does not exist: this server serves {model_name!r}", 'model',
                       'model_not_found')


def chat_prompt(body):
    """messages -> prompt ids, rendered by the tokenizer's chat template (ChatML, or an imported model's)."""
    messages = body.get('messages')
    if messages is None:
        raise ApiError(400, "messages is required", 'messages', 'missing_required_parameter')
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list of {role, content} objects", 'messages', 'invalid_type')
    conversation = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object with role and content", f'messages[{i}]',
                           'invalid_type')
        role, content = m.get('role'), m.get('content')
        if role not in ('system', 'developer', 'user', 'assistant'):
            raise ApiError(400, f"messages[{i}].role must be system, developer, user or assistant, not {shown(role)}",
                           f'messages[{i}].role', 'invalid_value')
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get('type') == 'text' and isinstance(p.get('text'), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content parts must be text parts ({{'type': 'text', 'text': "
                               "...}}): this model reads text only", f'messages[{i}].content', 'invalid_type')
            content = ''.join(p['text'] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string, not {shown(content)}",
                           f'messages[{i}].content', 'invalid_type')
        conversation.append({'role': 'system' if role == 'developer' else role, 'content': content})
    if system and conversation[0]['role'] != 'system':
        conversation.insert(0, {'role': 'system', 'content': system})
    try:
        return tokenizer.render_prompt(conversation)
    except Exception as e:  # a character a char tokenizer lacks, a template that refuses (roles must alternate...)
        raise ApiError(400, f"messages cannot be rendered for this model: {e}", 'messages', 'invalid_value') from None


def completion_prompts(body):
    """prompt (a string, strings, token ids, lists of token ids) -> prompt ids; text may hold special
    tokens (as TextGenerator reads it), and an empty text starts a fresh document."""
    prompt = body.get('prompt')
    if prompt is None:
        raise ApiError(400, "prompt is required", 'prompt', 'missing_required_parameter')

    def is_ids(x):
        return isinstance(x, list) and x and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
    if isinstance(prompt, str) or is_ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt) or all(map(is_ids, prompt))):
        prompts = prompt
    else:
        raise ApiError(400, "prompt must be a string, a list of strings, a list of token ids or a list of such lists, "
                       f"not {shown(prompt)}", 'prompt', 'invalid_type')
    out = []
    for p in prompts:
        if isinstance(p, list):
            if not all(0 <= i < tokenizer.n_vocab for i in p):
                raise ApiError(400, f"prompt token ids must be in [0, {tokenizer.n_vocab})", 'prompt', 'invalid_value')
            out.append(list(p))
            continue
        try:
            out.append(tokenizer.encode(p, allow_special=True) if p else [tokenizer.eot_id])
        except ValueError as e:  # a character the char tokenizer lacks
            raise ApiError(400, f"prompt cannot be tokenized: {e}", 'prompt', 'invalid_value') from None
    return out


async def read_body(request):
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError too; RecursionError: nesting too deep
        raise ApiError(400, f"the request body is not valid JSON: {e}", None, 'invalid_json') from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {shown(body)}", None, 'invalid_json')
    return body


# ----------------------------------------------------------------------------- responses

def usage(prompt_tokens, completion_tokens):
    return {'prompt_tokens': prompt_tokens, 'completion_tokens': completion_tokens,
            'total_tokens': prompt_tokens + completion_tokens}


def cancel(job):
    """The client has gone (or the handler ended early): the engine frees the job's slots next step."""
    job.cancelled = True
    engine.wake()


async def drain(queue):
    """The events of every step the engine has posted since the last call (waits for one)."""
    events = list(await queue.get())
    while not queue.empty():
        events += queue.get_nowait()
    return events


async def disconnected(request):
    """Returns once the client has closed its connection (the body is read: receive() waits for that)."""
    while (await request.receive())['type'] != 'http.disconnect':
        pass


async def complete(request, job, head, prompt_tokens, chat):
    """The whole response once every choice has finished; the job is cancelled if the client leaves first."""
    n = len(job.prompts) * job.n
    texts, reasons, counts = [''] * n, [None] * n, [0] * n
    gone = asyncio.ensure_future(disconnected(request))
    try:
        while None in reasons:
            events = asyncio.ensure_future(drain(job.events))
            await asyncio.wait({events, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not events.done():
                events.cancel()
                return Response(status_code=499)  # nginx's "client closed request": nobody reads it
            for event in events.result():
                if event[0] == 'error':
                    raise ApiError(500, event[1], None, 'engine_error', 'server_error')
                _, i, piece, reason, count = event
                texts[i] += piece
                reasons[i], counts[i] = reason, count
    finally:
        gone.cancel()
        if None in reasons:
            cancel(job)
    if chat:
        choices = [{'index': i, 'message': {'role': 'assistant', 'content': t}, 'logprobs': None, 'finish_reason': r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    else:
        choices = [{'index': i, 'text': t, 'logprobs': None, 'finish_reason': r}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
    return JSONResponse({**head, 'object': 'chat.completion' if chat else 'text_completion', 'choices': choices,
                         'usage': usage(prompt_tokens, sum(counts))})


async def stream(job, head, prompt_tokens, chat, include_usage):
    """Server-sent events in OpenAI's chunk format, one chunk per choice's new text or finish, then the
    usage (if asked) and [DONE]. If the client leaves, Starlette cancels this generator at its await
    and `finally` frees the job's slots."""
    head = {**head, 'object': 'chat.completion.chunk' if chat else 'text_completion'}

    def chunk(i, text=None, reason=None, role=False):
        if chat:
            delta = {'role': 'assistant', 'content': ''} if role else {} if text is None else {'content': text}
            choice = {'index': i, 'delta': delta, 'logprobs': None, 'finish_reason': reason}
        else:
            choice = {'index': i, 'text': text or '', 'logprobs': None, 'finish_reason': reason}
        return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n"

    left, completion_tokens = len(job.prompts) * job.n, 0
    try:
        if chat:
            for i in range(left):
                yield chunk(i, role=True)
        while left:
            out = []  # all the events waiting, in one write: under load the server sends fewer, larger packets
            for event in await drain(job.events):
                if event[0] == 'error':
                    left = 0
                    error = ApiError(500, event[1], None, 'engine_error', 'server_error').json()
                    out.append(f"data: {json.dumps(error)}\n\n")
                    break
                _, i, piece, reason, count = event
                if piece:
                    out.append(chunk(i, piece))
                if reason:
                    out.append(chunk(i, reason=reason))
                    left, completion_tokens = left - 1, completion_tokens + count
            yield ''.join(out)
        if include_usage:
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage(prompt_tokens, completion_tokens)})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        if left:
            cancel(job)


async def respond(request, body, prompts, prompt_param, chat):
    options = request_options(body, prompts, prompt_param)
    job = Job(prompts, options.n, options.generation, asyncio.get_running_loop())
    engine.submit(job)
    head = {'id': ('chatcmpl-' if chat else 'cmpl-') + uuid.uuid4().hex[:24], 'created': int(time.time()),
            'model': model_name}
    prompt_tokens = sum(len(p) for p in prompts)
    if options.stream:
        return StreamingResponse(stream(job, head, prompt_tokens, chat, options.include_usage),
                                 media_type='text/event-stream', headers={'Cache-Control': 'no-cache'})
    return await complete(request, job, head, prompt_tokens, chat)


# ----------------------------------------------------------------------------- the app

app = FastAPI(title='Mini-LLM', docs_url=None, redoc_url=None)  # no docs pages: they load scripts from a CDN
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'chat.html')
started = int(time.time())


@app.exception_handler(ApiError)
async def api_error(request, e):
    return e.response()


@app.exception_handler(HTTPException)
async def http_error(request, e):  # unknown path, wrong method
    return ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", None, None,
                    'invalid_request_error').response()


@app.exception_handler(Exception)
async def server_error(request, e):  # a bug: this request fails, the server goes on
    return ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, 'server_error').response()


@app.post('/v1/chat/completions')
async def chat_completions(request: Request):
    body = await read_body(request)
    check_model(body)
    return await respond(request, body, [chat_prompt(body)], 'messages', chat=True)


@app.post('/v1/completions')
async def completions(request: Request):
    body = await read_body(request)
    check_model(body)
    return await respond(request, body, completion_prompts(body), 'prompt', chat=False)


@app.get('/v1/models')
async def models():
    return {'object': 'list', 'data': [{'id': model_name, 'object': 'model', 'created': started, 'owned_by': 'mini-llm',
                                        'max_model_len': context}]}


@app.get('/health')
async def health():
    return {'status': 'ok', 'model': model_name, **engine.counters()}


@app.get('/')
async def page():
    if not os.path.exists(PAGE):
        raise ApiError(404, f"no chat page: {PAGE} is missing")
    with open(PAGE, encoding='utf-8') as f:
        return HTMLResponse(f.read())


# ----------------------------------------------------------------------------- run

step_fn = torch.compile(model, dynamic=True) if compile_model else None  # the decode step; prefill stays eager
engine = Engine(model, max_batch, context, step_fn)
threading.Thread(target=engine.run, name='engine', daemon=True).start()
family = socket.AF_INET6 if ':' in host else socket.AF_INET
# IPPROTO_TCP named, asyncio sets TCP_NODELAY on the connections (it checks the protocol); else Nagle's
# algorithm holds each small SSE chunk until the client's delayed ACK: +40 ms to the first token
sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    sock.bind((host, port))
except OSError as e:
    raise SystemExit(f"cannot listen on {host}:{port}: {e.strerror} (another server there? try --port=0)") from None
sock.listen(2048)  # connections wait from now on, even before uvicorn accepts them
cache_mb = 2 * engine.cache.k.numel() * engine.cache.k.element_size() / 1e6
print(f"loaded {ckpt_path}: {model.get_num_params() / 1e6:.2f}M params, {tokenizer.kind} tokenizer "
      f"({tokenizer.n_vocab} tokens), on {device} in {str(ptdtype).removeprefix('torch.')}; KV cache {max_batch} slots x {context} positions "
      f"({cache_mb:.0f} MB)")
print(f"serving {model_name!r} on http://{host}:{sock.getsockname()[1]}/ (OpenAI API at /v1)", flush=True)
# Ctrl-C / SIGTERM: stop accepting, give open streams 5 s, then close them (the engine thread is a daemon)
uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5)).run(sockets=[sock])
