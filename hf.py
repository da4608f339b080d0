"""
Our GPT <-> Hugging Face transformers, both ways: the architecture, the weights and the tokenizer.

    export: save_hf(ckpt, path)          any stage's checkpoint -> a directory that
                                         AutoModelForCausalLM / AutoTokenizer load (export.py)
    import: checkpoint_from_hf(path)     a transformers directory -> a checkpoint dict as our stages
                                         write it, so `--init_from=hf:PATH` fine-tunes it

Which transformers architecture a model is, is decided by its flags (model.py):

    rope + rmsnorm + swiglu                     Llama (GQA, tied or untied head, optional biases)
        with a bias on q, k, v only             Qwen2
        with qk_norm                            Qwen3
        with top-k experts (renormalised)       Mixtral (Qwen3-MoE with qk_norm)
    learned positions + layernorm + gelu        GPT-2

The layouts differ only in naming and packing: our attention projects q, k and v in one matrix
(rows: q heads, then k heads, then v heads) where Llama has three; our SwiGLU packs gate and up in
one matrix; GPT-2 stores Linear weights transposed (its Conv1D). RoPE is the same rotate-half
convention in both, so no permutation is needed. transformers is imported only on this path.
"""

import json
import os
import shutil

import torch

from model import GPT, GPTConfig
from tokenizer import CHATML_TEMPLATE, HFTokenizer  # the template renders our ChatML byte for byte


def _transformers():
    try:
        import transformers
    except ImportError:
        raise SystemExit("Hugging Face export/import needs transformers and safetensors: "
                         "pip install -r requirements.txt") from None
    transformers.logging.set_verbosity_error()  # its notes on our tiny test configs are noise here
    transformers.logging.disable_progress_bar()
    return transformers


# ----------------------------------------------------------------------------- architecture

def architecture(cfg):
    """The transformers model_type a GPTConfig maps onto exactly, or a ValueError naming what does not map."""
    c = cfg
    if c.pos == 'learned' and c.norm == 'layernorm' and c.mlp == 'gelu':
        unmapped = [name for name, bad in (('n_kv_head < n_head (GQA)', c.n_kv_head != c.n_head),
                                           ('qk_norm', c.qk_norm), ('n_experts', c.n_experts),
                                           ('head_dim != n_embd / n_head', c.head_dim * c.n_head != c.n_embd)) if bad]
        if unmapped:
            raise ValueError(f"a GPT-2-style model (learned positions, LayerNorm, GELU) with {', '.join(unmapped)} "
                             f"has no transformers architecture")
        return 'gpt2'
    if not (c.pos == 'rope' and c.norm == 'rmsnorm' and c.mlp == 'swiglu'):
        raise ValueError(f"pos={c.pos!r}, norm={c.norm!r}, mlp={c.mlp!r} has no transformers architecture: it takes "
                         f"rope + rmsnorm + swiglu (Llama/Qwen) or learned + layernorm + gelu (GPT-2)")
    if c.n_experts:
        unmapped = [name for name, bad in (('n_shared_experts', c.n_shared_experts),
                                           ('n_experts_active=1 (Switch routing)', c.n_experts_active == 1),
                                           ('moe_renormalize=False', not c.moe_renormalize and not c.qk_norm),
                                           ('bias', c.bias or c.qkv_bias)) if bad]
        if unmapped:
            raise ValueError(f"a mixture of experts with {', '.join(unmapped)} has no transformers architecture "
                             f"(Mixtral: top-k > 1, renormalised gates, no shared experts, no biases; "
                             f"Qwen3-MoE: the same with qk_norm)")
        return 'qwen3_moe' if c.qk_norm else 'mixtral'
    if c.qk_norm:
        if c.bias:
            raise ValueError("qk_norm with bias=True (biases in the MLP) has no transformers architecture (Qwen3 has "
                             "attention biases only)")
        return 'qwen3'
    if c.qkv_bias and not c.bias:
        return 'qwen2'
    return 'llama'


def hf_config(model_args, tokenizer):
    """A transformers config (object) for our model_args, with the tokenizer's special ids."""
    tf = _transformers()
    c = GPTConfig(**model_args)
    arch = architecture(c)
    ids = dict(bos_token_id=tokenizer.eot_id, eos_token_id=tokenizer.eot_id, pad_token_id=tokenizer.pad_id,
               tie_word_embeddings=c.tie_embeddings, vocab_size=c.vocab_size)
    if arch == 'gpt2':
        return tf.GPT2Config(n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head, n_positions=c.block_size,
                             n_inner=c.mlp_hidden, layer_norm_epsilon=c.norm_eps,
                             activation_function='gelu_new' if c.gelu_approximate == 'tanh' else 'gelu',
                             resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **ids)
    common = dict(hidden_size=c.n_embd, num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                  num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, intermediate_size=c.mlp_hidden,
                  max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps, hidden_act='silu',
                  rope_parameters={'rope_type': 'default', 'rope_theta': c.rope_theta}, attention_dropout=0.0, **ids)
    if arch == 'llama':  # (qkv_bias without bias maps to Qwen2)
        return tf.LlamaConfig(attention_bias=c.bias, mlp_bias=c.bias, **common)
    if arch == 'qwen2':
        return tf.Qwen2Config(use_sliding_window=False, **common)
    if arch == 'qwen3':
        # Qwen3's attention_bias covers q, k, v and o: o gets a zero bias when only q, k, v have one
        return tf.Qwen3Config(attention_bias=c.qkv_bias, use_sliding_window=False, **common)
    moe = dict(num_experts_per_tok=c.n_experts_active, router_aux_loss_coef=c.moe_aux_loss_coef)
    if arch == 'mixtral':
        return tf.MixtralConfig(num_local_experts=c.n_experts, **moe, **common)
    return tf.Qwen3MoeConfig(num_experts=c.n_experts, moe_intermediate_size=c.mlp_hidden, decoder_sparse_step=1,
                             mlp_only_layers=[], norm_topk_prob=c.moe_renormalize, **moe, **common)


def model_args_from_hf(hf):
    """Our model_args for a transformers config (object), or a ValueError naming what we cannot run."""
    t = hf.model_type
    if t == 'gpt2':
        if hf.activation_function not in ('gelu', 'gelu_new', 'gelu_pytorch_tanh'):
            raise ValueError(f"GPT-2 with activation_function={hf.activation_function!r} is not supported (gelu, gelu_new)")
        if hf.scale_attn_by_inverse_layer_idx or not hf.scale_attn_weights:
            raise ValueError("GPT-2 with scale_attn_by_inverse_layer_idx or without scale_attn_weights is not supported")
        return dict(vocab_size=hf.vocab_size, block_size=hf.n_positions, n_layer=hf.n_layer, n_head=hf.n_head,
                    n_embd=hf.n_embd, mlp_hidden=hf.n_inner or 4 * hf.n_embd, bias=True, norm='layernorm',
                    norm_eps=hf.layer_norm_epsilon, pos='learned', mlp='gelu',
                    gelu_approximate='none' if hf.activation_function == 'gelu' else 'tanh',
                    tie_embeddings=hf.tie_word_embeddings)
    if t not in ('llama', 'qwen2', 'qwen3', 'mixtral', 'qwen3_moe'):
        raise ValueError(f"model_type {t!r} is not supported: Llama, Qwen2, Qwen3, Mixtral, Qwen3-MoE or GPT-2")
    rope = dict(getattr(hf, 'rope_parameters', None) or {})
    if rope.get('rope_type', 'default') != 'default':
        raise ValueError(f"RoPE scaling {rope['rope_type']!r} is not supported (plain RoPE only)")
    if getattr(hf, 'use_sliding_window', False):
        raise ValueError("sliding-window attention (use_sliding_window=True) is not supported")
    if hf.hidden_act != 'silu':
        raise ValueError(f"hidden_act={hf.hidden_act!r} is not supported (SwiGLU with silu only)")
    attention_bias, mlp_bias = getattr(hf, 'attention_bias', False), getattr(hf, 'mlp_bias', False)
    if attention_bias != mlp_bias:  # our bias flag covers every Linear
        raise ValueError(f"attention_bias={attention_bias} with mlp_bias={mlp_bias} is not supported")
    args = dict(vocab_size=hf.vocab_size, block_size=hf.max_position_embeddings, n_layer=hf.num_hidden_layers,
                n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads or hf.num_attention_heads,
                n_embd=hf.hidden_size, head_dim=getattr(hf, 'head_dim', None) or hf.hidden_size // hf.num_attention_heads,
                bias=attention_bias, qkv_bias=t == 'qwen2', norm='rmsnorm', norm_eps=hf.rms_norm_eps, pos='rope',
                rope_theta=rope.get('rope_theta', 10000.0), mlp='swiglu', mlp_hidden=hf.intermediate_size,
                qk_norm=t in ('qwen3', 'qwen3_moe'), tie_embeddings=hf.tie_word_embeddings)
    if t == 'mixtral':
        args.update(n_experts=hf.num_local_experts, n_experts_active=hf.num_experts_per_tok, moe_renormalize=True)
    if t == 'qwen3_moe':
        if hf.mlp_only_layers or hf.decoder_sparse_step != 1:
            raise ValueError("Qwen3-MoE with dense layers (mlp_only_layers, decoder_sparse_step) is not supported")
        args.update(n_experts=hf.num_experts, n_experts_active=hf.num_experts_per_tok, mlp_hidden=hf.moe_intermediate_size,
                    moe_renormalize=hf.norm_topk_prob)
    return args


# ----------------------------------------------------------------------------- weights

def hf_state_dict(state, cfg, arch):
    """Our state dict -> transformers' names and layouts. Biases our model has not get zeros (GPT-2 always
    has them; Llama's o_proj has one whenever q, k, v do), which computes the same function."""
    c, out = cfg, {}
    q, kv = c.n_head * c.head_dim, c.n_kv_head * c.head_dim
    get = lambda key, shape: state[key] if key in state else torch.zeros(shape)  # noqa: E731
    if arch == 'gpt2':
        out['transformer.wte.weight'] = state['transformer.wte.weight']
        out['transformer.wpe.weight'] = state['transformer.wpe.weight']
        for i in range(c.n_layer):
            ours, theirs = f'transformer.h.{i}.', f'transformer.h.{i}.'
            for norm in ('ln_1', 'ln_2'):
                out[theirs + norm + '.weight'] = state[ours + norm + '.weight']
                out[theirs + norm + '.bias'] = get(ours + norm + '.bias', c.n_embd)
            for name, width in (('attn.c_attn', q + 2 * kv), ('attn.c_proj', c.n_embd),
                                ('mlp.c_fc', c.mlp_hidden), ('mlp.c_proj', c.n_embd)):
                out[theirs + name + '.weight'] = state[ours + name + '.weight'].t()  # Conv1D: (in, out)
                out[theirs + name + '.bias'] = get(ours + name + '.bias', width)
        out['transformer.ln_f.weight'] = state['transformer.ln_f.weight']
        out['transformer.ln_f.bias'] = get('transformer.ln_f.bias', c.n_embd)
        out['lm_head.weight'] = state['lm_head.weight']
        return out
    out['model.embed_tokens.weight'] = state['transformer.wte.weight']
    for i in range(c.n_layer):
        ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
        out[theirs + 'input_layernorm.weight'] = state[ours + 'ln_1.weight']
        out[theirs + 'post_attention_layernorm.weight'] = state[ours + 'ln_2.weight']
        attn = theirs + 'self_attn.'
        for part in ('weight', 'bias'):
            if ours + 'attn.c_attn.' + part in state:
                wq, wk, wv = state[ours + 'attn.c_attn.' + part].split([q, kv, kv])
                out[attn + 'q_proj.' + part], out[attn + 'k_proj.' + part], out[attn + 'v_proj.' + part] = wq, wk, wv
        out[attn + 'o_proj.weight'] = state[ours + 'attn.c_proj.weight']
        if c.bias or (c.qkv_bias and arch == 'qwen3'):
            out[attn + 'o_proj.bias'] = get(ours + 'attn.c_proj.bias', c.n_embd)
        if c.qk_norm:
            out[attn + 'q_norm.weight'] = state[ours + 'attn.q_norm.weight']
            out[attn + 'k_norm.weight'] = state[ours + 'attn.k_norm.weight']
        if c.n_experts:
            moe = theirs + 'mlp.'
            out[moe + 'gate.weight'] = state[ours + 'mlp.router.weight']
            # ours: w_in (E, C, [gate | up]), w_out (E, H, C); transformers: (E, [gate | up], C), (E, C, H)
            out[moe + 'experts.gate_up_proj'] = state[ours + 'mlp.w_in'].transpose(1, 2)
            out[moe + 'experts.down_proj'] = state[ours + 'mlp.w_out'].transpose(1, 2)
            continue
        gate, up = state[ours + 'mlp.c_fc.weight'].chunk(2)
        out[theirs + 'mlp.gate_proj.weight'], out[theirs + 'mlp.up_proj.weight'] = gate, up
        out[theirs + 'mlp.down_proj.weight'] = state[ours + 'mlp.c_proj.weight']
        if c.bias:
            out[theirs + 'mlp.gate_proj.bias'], out[theirs + 'mlp.up_proj.bias'] = state[ours + 'mlp.c_fc.bias'].chunk(2)
            out[theirs + 'mlp.down_proj.bias'] = state[ours + 'mlp.c_proj.bias']
    out['model.norm.weight'] = state['transformer.ln_f.weight']
    out['lm_head.weight'] = state['lm_head.weight']
    return out


def state_dict_from_hf(hf_state, cfg, arch):
    """transformers' state dict -> ours: the inverse of hf_state_dict (biases that are all zero in
    GPT-2 are kept: our GPT-2 flags have bias=True)."""
    c, out = cfg, {}
    hf_state = dict(hf_state)
    if 'lm_head.weight' not in hf_state:  # a tied head may be saved only once
        hf_state['lm_head.weight'] = hf_state['transformer.wte.weight' if arch == 'gpt2' else 'model.embed_tokens.weight']
    if arch == 'gpt2':
        for key, v in hf_state.items():
            if key.endswith('.attn.bias') or key.endswith('.attn.masked_bias'):
                continue  # old GPT-2 files store the causal mask as a buffer
            conv1d = any(key.endswith(f'{n}.weight') for n in ('c_attn', 'c_proj', 'c_fc'))
            out[key] = v.t() if conv1d else v
        return out
    out['transformer.wte.weight'] = hf_state['model.embed_tokens.weight']
    for i in range(c.n_layer):
        ours, theirs = f'transformer.h.{i}.', f'model.layers.{i}.'
        attn = theirs + 'self_attn.'
        out[ours + 'ln_1.weight'] = hf_state[theirs + 'input_layernorm.weight']
        out[ours + 'ln_2.weight'] = hf_state[theirs + 'post_attention_layernorm.weight']
        for part in ('weight', 'bias'):
            if attn + 'q_proj.' + part in hf_state:
                out[ours + 'attn.c_attn.' + part] = torch.cat([hf_state[attn + p + '_proj.' + part] for p in 'qkv'])
        out[ours + 'attn.c_proj.weight'] = hf_state[attn + 'o_proj.weight']
        if c.bias:
            out[ours + 'attn.c_proj.bias'] = hf_state[attn + 'o_proj.bias']
        if c.qk_norm:
            out[ours + 'attn.q_norm.weight'] = hf_state[attn + 'q_norm.weight']
            out[ours + 'attn.k_norm.weight'] = hf_state[attn + 'k_norm.weight']
        if c.n_experts:
            moe = theirs + 'mlp.'
            out[ours + 'mlp.router.weight'] = hf_state[moe + 'gate.weight']
            out[ours + 'mlp.w_in'] = hf_state[moe + 'experts.gate_up_proj'].transpose(1, 2)
            out[ours + 'mlp.w_out'] = hf_state[moe + 'experts.down_proj'].transpose(1, 2)
            continue
        mlp = theirs + 'mlp.'
        out[ours + 'mlp.c_fc.weight'] = torch.cat([hf_state[mlp + 'gate_proj.weight'], hf_state[mlp + 'up_proj.weight']])
        out[ours + 'mlp.c_proj.weight'] = hf_state[mlp + 'down_proj.weight']
        if c.bias:
            out[ours + 'mlp.c_fc.bias'] = torch.cat([hf_state[mlp + 'gate_proj.bias'], hf_state[mlp + 'up_proj.bias']])
            out[ours + 'mlp.c_proj.bias'] = hf_state[mlp + 'down_proj.bias']
    out['transformer.ln_f.weight'] = hf_state['model.norm.weight']
    out['lm_head.weight'] = hf_state['lm_head.weight']
    return out


# ----------------------------------------------------------------------------- tokenizer

def hf_tokenizer(tokenizer):
    """Our tokenizer -> a transformers PreTrainedTokenizerFast with the same ids, our special
    tokens and a chat template that renders our ChatML byte for byte. Byte-level BPE (bpe, gpt2)
    goes through transformers' own tiktoken converter: the vocabulary, the merges recovered from
    tiktoken's ranks, our split pattern, byte-level pre-tokenizer and decoder."""
    tf = _transformers()
    if tokenizer.kind == 'hf':  # imported: its own files come back out unchanged
        return tokenizer.to_transformers()
    if tokenizer.kind == 'char':
        fast = _char_tokenizer(tokenizer)
    else:
        import base64
        import tempfile
        from transformers.convert_slow_tokenizer import TikTokenConverter
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, 'ranks.tiktoken')  # tiktoken's file format: base64 token, rank
            with open(path, 'w') as f:
                f.writelines(f"{base64.b64encode(b).decode()} {r}\n" for b, r in tokenizer.enc._mergeable_ranks.items())
            fast = TikTokenConverter(vocab_file=path, pattern=tokenizer.enc._pat_str).converted()
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    fast.add_special_tokens([tf.AddedToken(name, normalized=False, special=True) for name, _ in specials])
    for name, i in specials:  # added tokens take the next free ids: ours must come out the same
        if fast.token_to_id(name) != i:
            raise ValueError(f"special token {name} got id {fast.token_to_id(name)} in the export, ours is {i}")
    id_to_name = {i: n for n, i in tokenizer.special_tokens.items()}
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=fast, bos_token=id_to_name[tokenizer.eot_id], eos_token=id_to_name[tokenizer.eot_id],
        pad_token=id_to_name[tokenizer.pad_id], chat_template=CHATML_TEMPLATE, clean_up_tokenization_spaces=False)


def _char_tokenizer(tokenizer):
    """A char tokenizer as a tokenizers BPE with no merges: every character is its own token."""
    from tokenizers import Tokenizer as RustTokenizer, decoders, models
    vocab = {ch: i for i, ch in enumerate(tokenizer.spec['chars'])}
    fast = RustTokenizer(models.BPE(vocab=vocab, merges=[], ignore_merges=True))
    fast.decoder = decoders.Fuse()  # characters join with nothing between them
    return fast


# ----------------------------------------------------------------------------- export and import

def to_hf_model(ckpt, tokenizer):
    """A transformers model (fp32, eval mode) with the weights of our checkpoint; its config takes
    the special ids of `tokenizer` (the checkpoint's)."""
    tf = _transformers()
    args = ckpt['model_args']
    cfg = GPTConfig(**args)
    config = hf_config(args, tokenizer)
    state = {k.removeprefix('_orig_mod.').removeprefix('module.'): v.float() for k, v in ckpt['model'].items()}
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(hf_state_dict(state, cfg, architecture(cfg)), strict=True)  # every weight, nothing left over
    return model.eval()


def save_hf(ckpt, path, dtype='float32'):
    """Write a checkpoint as a transformers directory: config.json, model.safetensors,
    generation_config.json, tokenizer.json + tokenizer_config.json (+ chat_template.jinja)."""
    from common import tokenizer_from_checkpoint
    tokenizer = tokenizer_from_checkpoint(ckpt)  # built once: an imported one parses its tokenizer.json
    model = to_hf_model(ckpt, tokenizer)
    model.to({'float32': torch.float32, 'bfloat16': torch.bfloat16, 'float16': torch.float16}[dtype])
    gen = model.generation_config
    # a chat model ends its turn with <|im_end|>, a document with <|endoftext|>: stop at either, as sample.py does
    gen.eos_token_id = sorted({tokenizer.im_end_id, tokenizer.eot_id})
    gen.pad_token_id = tokenizer.pad_id
    gen.bos_token_id = None
    if model.config.vocab_size > tokenizer.n_vocab:  # the padded ids (vocab rounded up) never come out
        gen.suppress_tokens = list(range(tokenizer.n_vocab, model.config.vocab_size))
    # written beside, then swapped in: a crash mid-export leaves the previous export whole
    tmp = f'{path.rstrip("/")}.tmp{os.getpid()}'
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    hf_tokenizer(tokenizer).save_pretrained(tmp)
    lineage = {k: ckpt.get(k) for k in ('stage', 'iter_num', 'parent', 'dataset', 'tokenizer_identity')}
    with open(os.path.join(tmp, 'mini_llm.json'), 'w') as f:
        json.dump({'exported_from': lineage, 'model_args': ckpt['model_args']}, f, indent=1, default=str)
    if os.path.isdir(path):
        shutil.rmtree(path)
    os.replace(tmp, path)
    return model


def load_exported(path):
    """A transformers directory as transformers loads it, in fp32 and eval mode."""
    return _transformers().AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def checkpoint_from_hf(path):
    """A transformers model directory -> a checkpoint dict in our layout (stage 'hf'), with the
    model's own tokenizer (tokenizer.HFTokenizer: its BPE, special tokens and chat template)."""
    tf = _transformers()
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise SystemExit(f"init_from=hf:{path}: no config.json there (a transformers model directory, as "
                         f"save_pretrained or `hf download` writes it)")
    config = tf.AutoConfig.from_pretrained(path)
    try:
        args = model_args_from_hf(config)
    except ValueError as e:
        raise SystemExit(f"{path}: {e}") from None
    cfg = GPTConfig(**args)
    hf_model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    state = state_dict_from_hf(hf_model.state_dict(), cfg, architecture(cfg))
    model = GPT(cfg)
    model.load_state_dict(state, strict=True)  # every weight accounted for, nothing left over
    try:
        tokenizer = HFTokenizer.from_dir(path)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"init_from=hf:{path}: {e}") from None
    return {'stage': 'hf', 'model': model.state_dict(), 'model_args': cfg.to_dict(), 'tokenizer': tokenizer.spec,
            'tokenizer_identity': tokenizer.identity, 'config': {'hf_path': os.path.abspath(path)},
            'iter_num': 0, 'best_val_loss': float('inf'), 'parent': None, 'dataset': None}
