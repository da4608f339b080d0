"""
Export any stage's checkpoint for use outside this repo:

    python export.py --out_dir=out-sft                         # -> out-sft-hf/, a transformers directory
    python export.py --out_dir=out-sft --export_format=gguf    # -> out-sft.gguf, for llama.cpp / Ollama

The Hugging Face directory (config.json, model.safetensors, generation_config.json, tokenizer.json,
tokenizer_config.json with a chat template that renders our ChatML) loads with
AutoModelForCausalLM/AutoTokenizer.from_pretrained, lm-eval-harness's `hf` backend, vLLM, and is
what `--init_from=hf:PATH` imports back. LoRA runs export their merged weights; a reward model
exports its language-model backbone. After writing, the export is loaded back and its logits are
compared with ours (check=True).
"""

import torch

import common
import hf
from configurator import configure

# ----------------------------------------------------------------------------- config
out_dir = 'out-sft'  # the run to export (its best.pt, else ckpt.pt), or a .pt file
init_checkpoint = 'best'  # 'best' | 'latest' (ckpt.pt)
export_format = 'hf'  # 'hf' (a transformers directory) | 'gguf' (one file for llama.cpp)
export_path = ''  # '' = <out_dir>-hf for hf, <out_dir>.gguf for gguf
dtype = 'float32'  # of the exported weights: 'float32' | 'bfloat16' | 'float16'
check = True  # load the export back and compare its logits with ours
config = configure(globals())  # overrides from config files and --key=value arguments
# -----------------------------------------------------------------------------

if export_format not in ('hf', 'gguf'):
    raise SystemExit(f"export_format={export_format!r}: use 'hf' or 'gguf'")
if dtype not in ('float32', 'bfloat16', 'float16'):
    raise SystemExit(f"dtype={dtype!r}: use 'float32', 'bfloat16' or 'float16'")
source = common.checkpoint_path(out_dir, init_checkpoint)
ckpt = common.load_checkpoint(source)
base = out_dir.removesuffix('.pt').rstrip('/')
path = export_path or (f'{base}-hf' if export_format == 'hf' else f'{base}.gguf')
model = common.model_from_checkpoint(ckpt).eval()
try:
    arch = hf.architecture(model.config)
except ValueError as e:
    raise SystemExit(f"{source}: {e}") from None
print(f"{source}: stage {ckpt.get('stage', '?')}, {model.get_num_params() / 1e6:.2f}M params -> {arch}")

if export_format == 'hf':
    hf.save_hf(ckpt, path, dtype)
else:
    import gguf_export
    gguf_export.save_gguf(ckpt, path, dtype)
print(f"wrote {path}")

if check:
    # a real prompt in our chat format, through the exported model: the logits must be ours
    tokenizer = common.tokenizer_from_checkpoint(ckpt)
    prompt = tokenizer.render_prompt([{'role': 'user', 'content': 'What is 12+30?'}])[-model.config.block_size:]
    ids = torch.tensor([prompt])
    exported = hf.load_exported(path) if export_format == 'hf' else gguf_export.load_exported(path)
    if dtype != 'float32':  # compare with our weights rounded as the export's were (not the RoPE tables)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(p.to(getattr(torch, dtype)).float())
    with torch.no_grad():
        ours, theirs = model(ids)[0], exported(ids).logits
    diff = (ours - theirs).abs().max().item()
    print(f"check: max |logit difference| on a {len(prompt)}-token prompt = {diff:.2e} (tolerance 1e-4)")
    if diff > 1e-4:
        raise SystemExit(f"the export's logits differ from ours by {diff:.3g}: please report this")
