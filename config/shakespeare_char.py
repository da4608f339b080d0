# The classic nanoGPT CPU recipe: a character-level model of Shakespeare.
#   python prepare.py --dataset=shakespeare_char --sources=PATH/input.txt --tokenizer_type=char
#   python train.py config/shakespeare_char.py
# (nanoGPT reports val loss 1.88 for this shape on CPU; ours uses RoPE/RMSNorm/SwiGLU and reaches 1.655,
# in 61 s on 2 cores in bf16.)
out_dir = 'out-shakespeare-char'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 10
wandb_run_name = 'shakespeare-char'

block_size = 64
batch_size = 12
gradient_accumulation_steps = 1
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3  # small models tolerate a higher rate
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99  # few tokens per step: a shorter second-moment memory
warmup_iters = 100
device = 'cpu'
# bf16 autocast where the CPU has bf16 matmul instructions (AVX-512 BF16, AMX): 30 against 40 ms
# a step on the 2-core dev machine. Elsewhere bf16 is emulated and slower than fp32.
import common  # noqa: E402
dtype = 'bfloat16' if common.cpu_has_native_bf16() else 'float32'
compile_model = False
