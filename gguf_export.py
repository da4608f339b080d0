"""
Our GPT -> one GGUF file that llama.cpp and Ollama run, written with the `gguf` package (llama.cpp's
own gguf-py) the way llama.cpp's converter writes a transformers checkpoint:

    save_gguf(ckpt, path, dtype)   any stage's checkpoint -> path (export.py --export_format=gguf)
    load_exported(path)            the file as transformers' GGUF loader reads it back (export.py's check)

We follow llama.cpp's convert_hf_to_gguf.py (github.com/ggml-org/llama.cpp, read at 0024aa74) from
the layout hf.py already gives us: hf.hf_state_dict puts the weights under transformers' names, and
gguf's own TensorNameMap renames them as the converter's map_tensor_name does. What else changes:

    1. RoPE. llama.cpp's 'llama' architecture rotates interleaved pairs (x0, x1), (x2, x3), ... where
       we and transformers rotate the two halves of each head: the q and k rows of every head are
       permuted (LlamaModel.permute), which makes the two the same attention. qwen2, qwen3 and
       qwen3moe rotate halves in llama.cpp too (NEOX): no permutation.
    2. Tied head: no output.weight; llama.cpp then computes the logits with token_embd.
    3. Experts: one 3-D tensor per projection, (E, H, C) for gate and up, (E, C, H) for down.
    4. GPT-2: transformers' Conv1D weights go back to (out, in).
    5. dtype: matrices in f16/bf16, 1-D tensors, norms, the MoE router and GPT-2's position table
       stored f32, as the converter keeps them (prepare_tensors). Every value is first rounded to the
       export dtype (the f32 ones too), so the file holds the weights export.py's check compares with.
    6. Tokenizer: byte-level BPE ('gpt2' model) with our vocabulary, merges and ChatML template,
       and the name of the pre-tokenizer llama.cpp has compiled in that splits text as ours does
       (pre_tokenizer, LLAMA_CPP_SPLITS; tests/test_gguf.py checks the regexes against each other).

Which architecture a model is comes from hf.architecture; llama.cpp runs fewer variants exactly
than transformers does (gguf_architecture says which, and why).
"""

import json
import os

import gguf
import numpy as np
import torch

import hf
from common import model_from_checkpoint, tokenizer_from_checkpoint
from model import GPTConfig
from tokenizer import SPLIT_PATTERN

# hf.architecture's name -> llama.cpp's (Mixtral is llama.cpp's 'llama' with experts)
GGUF_ARCH = {'llama': 'llama', 'mixtral': 'llama', 'qwen2': 'qwen2', 'qwen3': 'qwen3', 'qwen3_moe': 'qwen3moe',
             'gpt2': 'gpt2'}

# The pre-tokenizers llama.cpp has compiled in, by the tokenizer.ggml.pre name that selects them: the
# regexes it runs, copied from src/llama-vocab.cpp (llm_tokenizer_bpe; ggml-org/llama.cpp at
# 00ad355e). 'qwen2' is Qwen2's split with (?i:...) spelled out in ASCII; 'gpt-2' leaves the final
# `|\s+` out, and llama.cpp emits whatever no alternative matches as a piece of its own.
LLAMA_CPP_SPLITS = {
    'qwen2': r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    'gpt-2': r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
}


def pre_tokenizer(tokenizer):
    """tokenizer.ggml.pre for our tokenizer: the llama.cpp pre-tokenizer that splits text exactly as
    ours does, or a ValueError. Ours (tokenizer.SPLIT_PATTERN, GPT-4's with single digits) splits as
    Qwen2's does (tests/test_gguf.py shows the one difference: a contraction spelled with the long s
    'ſ', which our (?i:s) matches and llama.cpp's [sS] does not)."""
    if tokenizer.kind == 'gpt2':
        return 'gpt-2'
    if tokenizer.kind == 'bpe' and tokenizer.spec['pattern'] == SPLIT_PATTERN:
        return 'qwen2'
    raise ValueError(f"a BPE with the split pattern {tokenizer.spec.get('pattern')!r} has no llama.cpp "
                     f"pre-tokenizer known to split as it does (ours, tokenizer.SPLIT_PATTERN, is llama.cpp's 'qwen2')")


# ----------------------------------------------------------------------------- architecture

def gguf_architecture(cfg):
    """(hf.architecture's name, llama.cpp's) for a GPTConfig, or a ValueError naming what llama.cpp
    would not compute exactly."""
    arch = hf.architecture(cfg)  # a ValueError for flags no transformers architecture has
    c, unsupported = cfg, []
    if arch == 'gpt2' and c.gelu_approximate != 'tanh':
        unsupported.append("exact GELU (gelu_approximate='none'): llama.cpp's gpt2 computes the tanh approximation "
                           "(ggml_gelu); train with --gelu_approximate=tanh")
    if arch == 'qwen3' and c.qkv_bias:
        unsupported.append("qkv_bias with qk_norm: llama.cpp's qwen3 has no attention biases")
    if arch == 'qwen3_moe' and not c.moe_renormalize:
        unsupported.append("moe_renormalize=False: llama.cpp's qwen3moe always renormalises the top-k gates")
    if unsupported:
        raise ValueError(f"this {arch} model has no exact llama.cpp equivalent: {'; '.join(unsupported)}")
    return arch, GGUF_ARCH[arch]


# ----------------------------------------------------------------------------- weights

def permute_for_llama_rope(w, n_head):
    """q or k rows (n_head * hs, ...) in rotate-half order -> llama.cpp's interleaved order: within a
    head, rows (i, hs/2 + i) become rows (2i, 2i + 1). convert_hf_to_gguf.py, LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state, cfg, arch):
    """Our state dict -> {llama.cpp tensor name: fp32 tensor} in llama.cpp's layouts, as
    convert_hf_to_gguf's modify_tensors yields them from transformers' state dict."""
    arch_id = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == GGUF_ARCH[arch])
    names = gguf.get_tensor_name_map(arch_id, cfg.n_layer)
    out = {}
    for name, t in hf.hf_state_dict(state, cfg, arch).items():
        t = t.detach().float()
        if name == 'lm_head.weight' and cfg.tie_embeddings:
            continue  # llama.cpp reads token_embd when output.weight is absent
        if arch in ('llama', 'mixtral') and name.endswith(('q_proj.weight', 'q_proj.bias')):
            t = permute_for_llama_rope(t, cfg.n_head)
        if arch in ('llama', 'mixtral') and name.endswith(('k_proj.weight', 'k_proj.bias')):
            t = permute_for_llama_rope(t, cfg.n_kv_head)
        if arch == 'gpt2' and name.endswith(('c_attn.weight', 'c_proj.weight', 'c_fc.weight')):
            t = t.t()  # Conv1D (in, out) -> (out, in)
        parts = {name: t}
        if name.endswith('experts.gate_up_proj'):  # (E, 2H, C): gate rows, then up rows
            gate, up = t.chunk(2, dim=1)
            parts = {name.replace('gate_up_proj', 'gate_proj'): gate, name.replace('gate_up_proj', 'up_proj'): up}
        for part, tensor in parts.items():
            new = names.get_name(part, try_suffixes=('.weight', '.bias'))
            if new is None:
                raise ValueError(f"{part}: no {GGUF_ARCH[arch]} tensor name for it in gguf's TensorNameMap")
            if not new.endswith(('.weight', '.bias')):
                new += '.weight'  # the merged expert tensors carry no suffix in transformers
            out[new] = tensor.contiguous()
    return out


def keeps_f32(name, ndim):
    """Tensors convert_hf_to_gguf's prepare_tensors stores in f32 whatever the file type: 1-D ones,
    norms, the MoE router and the position table."""
    return ndim <= 1 or name.endswith('_norm.weight') or '.ffn_gate_inp.' in name or name.startswith('position_embd.')


# ----------------------------------------------------------------------------- tokenizer

def gguf_vocab(tokenizer, vocab_size):
    """(tokens, token types, merges) as llama.cpp's byte-level BPE reads them: our ids in order, each
    token spelled in GPT-2's byte-to-unicode alphabet, special tokens CONTROL, and the ids past the
    tokenizer (vocab_size rounded up) as unused [PADi] (convert_hf_to_gguf.py, get_vocab_base)."""
    fast = json.loads(hf.hf_tokenizer(tokenizer).backend_tokenizer.to_str())
    by_id = {i: token for token, i in fast['model']['vocab'].items()}
    by_id.update({t['id']: t['content'] for t in fast['added_tokens']})
    special = set(tokenizer.special_tokens.values())
    if tokenizer.n_vocab > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.n_vocab} ids, more than the model's vocab_size {vocab_size}")
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f'[PAD{i}]')
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else ' '.join(m) for m in fast['model']['merges']]
    return tokens, types, merges


def _tokenizer_of(ckpt):
    kind = ckpt['tokenizer'].get('kind')
    if kind == 'char':
        raise ValueError("a char tokenizer has no llama.cpp equivalent (llama.cpp runs byte-level BPE or "
                         "sentencepiece vocabularies): export it with --export_format=hf, or train on a BPE "
                         "(prepare.py --tokenizer_type=bpe)")
    if kind == 'hf':
        raise NotImplementedError("GGUF export of an imported Hugging Face tokenizer (kind 'hf') is not supported "
                                  "yet: export with --export_format=hf, or convert that directory with llama.cpp's "
                                  "convert_hf_to_gguf.py")
    return tokenizer_from_checkpoint(ckpt)


# ----------------------------------------------------------------------------- export

DTYPES = {'float32': torch.float32, 'float16': torch.float16, 'bfloat16': torch.bfloat16}


def save_gguf(ckpt, path, dtype='float32'):
    """Write a checkpoint as one GGUF file: llama.cpp's metadata for the architecture, the tokenizer
    and chat template, and the weights in `dtype` (matrices; see keeps_f32)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: use one of {', '.join(DTYPES)}")
    cfg = GPTConfig(**ckpt['model_args'])
    arch, gguf_arch = gguf_architecture(cfg)
    tokenizer = _tokenizer_of(ckpt)
    pre = pre_tokenizer(tokenizer)
    tokens, types, merges = gguf_vocab(tokenizer, cfg.vocab_size)
    state = model_from_checkpoint(ckpt).state_dict()  # every weight of our GPT, nothing else (strict load)
    tensors = gguf_tensors(state, cfg, arch)

    tmp = path + '.tmp'  # written whole, then renamed: an interrupted export leaves no half file
    w = gguf.GGUFWriter(tmp, gguf_arch)  # writes general.architecture

    # 1) the model: the keys llama.cpp reads for this architecture (and transformers' GGUF loader maps)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_file_type({'float32': gguf.LlamaFileType.ALL_F32, 'float16': gguf.LlamaFileType.MOSTLY_F16,
                     'bfloat16': gguf.LlamaFileType.MOSTLY_BF16}[dtype])
    w.add_context_length(cfg.block_size)
    w.add_embedding_length(cfg.n_embd)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.mlp_hidden)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_vocab_size(cfg.vocab_size)
    if arch == 'gpt2':
        w.add_layer_norm_eps(cfg.norm_eps)
    else:
        w.add_key_length(cfg.head_dim)
        w.add_value_length(cfg.head_dim)
        w.add_rope_dimension_count(cfg.head_dim)
        w.add_rope_freq_base(cfg.rope_theta)
        w.add_layer_norm_rms_eps(cfg.norm_eps)
    if cfg.n_experts:
        w.add_expert_count(cfg.n_experts)
        w.add_expert_used_count(cfg.n_experts_active)
        w.add_expert_feed_forward_length(cfg.mlp_hidden)

    # 2) the tokenizer: byte-level BPE, our special ids and ChatML
    w.add_tokenizer_model('gpt2')
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokenizer.eot_id)  # documents start with <|endoftext|> in pretraining
    w.add_eos_token_id(tokenizer.eot_id)
    w.add_eot_token_id(tokenizer.im_end_id)  # a chat turn ends with <|im_end|>: llama.cpp stops at either
    w.add_pad_token_id(tokenizer.pad_id)
    w.add_add_bos_token(False)  # our prompts (render_prompt) carry no BOS
    w.add_add_eos_token(False)
    w.add_chat_template(hf.CHATML_TEMPLATE)

    # 3) the weights, rounded to dtype first (see the module docstring, 5.)
    for name, t in tensors.items():
        t = t.to(DTYPES[dtype]).float()
        if dtype == 'float32' or keeps_f32(name, t.dim()):
            w.add_tensor(name, t.numpy())
        elif dtype == 'float16':
            w.add_tensor(name, t.numpy().astype(np.float16))
        else:  # bf16 bytes, rounded to nearest even as ggml does (exact here: t is bf16 already)
            qtype = gguf.GGMLQuantizationType.BF16
            w.add_tensor(name, gguf.quantize(t.numpy(), qtype), raw_dtype=qtype)

    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return path


# ----------------------------------------------------------------------------- load back

def load_exported(path):
    """The GGUF as transformers' own GGUF loader reads it (un-permuting llama's q/k), fp32, eval mode.

    transformers 5.25 maps fewer of llama.cpp's keys than llama.cpp reads; the ones it skips are
    filled in from the file itself, under the key llama.cpp reads them from, so the check still
    reads everything from the file:
        head_dim               <- {arch}.attention.key_length (qwen2, qwen3)
        moe_intermediate_size  <- qwen3moe.expert_feed_forward_length
        attention/mlp_bias     <- whether the file holds blk.0.attn_q.bias / blk.0.ffn_up.bias (llama)
        n_positions, n_inner   <- gpt2.context_length, gpt2.feed_forward_length
    A llama file with experts (Mixtral) is a NotImplementedError: transformers reads 'llama' as dense."""
    tf = hf._transformers()
    reader = gguf.GGUFReader(path)
    arch = reader.fields['general.architecture'].contents()

    def meta(key):
        return reader.fields[f'{arch}.{key}'].contents() if f'{arch}.{key}' in reader.fields else None

    tensor_names = {t.name for t in reader.tensors}
    if arch == 'llama' and meta('expert_count'):
        raise NotImplementedError(f"{path}: transformers' GGUF loader reads a 'llama' file as a dense Llama and "
                                  f"cannot load its experts (Mixtral); the file is for llama.cpp. Skip the check "
                                  f"(export.py --check=False)")
    folder, name = os.path.split(os.path.abspath(path))
    config = tf.AutoConfig.from_pretrained(folder, gguf_file=name)
    if arch in ('qwen2', 'qwen3'):
        config.head_dim = meta('attention.key_length')
    if arch == 'qwen3moe':
        config.moe_intermediate_size = meta('expert_feed_forward_length')
    if arch == 'llama':
        config.attention_bias = 'blk.0.attn_q.bias' in tensor_names
        config.mlp_bias = 'blk.0.ffn_up.bias' in tensor_names
    if arch == 'gpt2':
        config.n_positions, config.n_inner = meta('context_length'), meta('feed_forward_length')
    model = tf.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, config=config, dtype=torch.float32)
    return model.eval()
