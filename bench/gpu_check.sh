#!/usr/bin/env bash
# GPU smoke test and speed check: every stage on a CUDA GPU, one table at the end.
#   - pretrain_small (the GPT-2-small-class model) for 200 steps in bf16, compiled: val loss, tok/s, MFU
#   - generation tok/s: sample.py on that checkpoint, and bench_generate.py's warm decode at its shape
#   - every stage's tiny config on cuda for a few steps, chained as pipeline.py chains them
#     (pretrain -> sft -> reward, dpo, ppo (RLHF, critic from the reward model), grpo)
#   - train.py under `torchrun --nproc_per_node=1`, and on all GPUs when there are several
#   - FSDP (train.py --parallel=fsdp under torchrun), when train.py has that key
# Offline: the data is `python prepare.py` on the built-in corpus (the Python standard library).
#
#   bash bench/gpu_check.sh [OUT_DIR]     # default out/gpu_check (or $OUT_DIR)
#
# Needs a CUDA GPU (and a CUDA build of torch). Expected: about 5 minutes on one H200 (an estimate,
# not yet measured; the target is under 8 minutes, and the table says when a run went over).
# Each step logs to OUT_DIR/logs/STEP.log and runs in OUT_DIR/runs/STEP. Any failing step stops
# the script with its name, its command and the last 40 lines of its log, and a non-zero exit.
# Environment: PYTHON (default python), NGPU (default: torch.cuda.device_count()),
# STEP_TIMEOUT (seconds per step, default 300).
set -Eeuo pipefail
trap 'echo "gpu_check: FAILED at line $LINENO: $BASH_COMMAND" >&2' ERR

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${1:-${OUT_DIR:-$ROOT/out/gpu_check}}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$ROOT"
PY=${PYTHON:-python}
DATA=$OUT/data RUNS=$OUT/runs LOGS=$OUT/logs
rm -rf "$DATA" "$RUNS" "$LOGS"
mkdir -p "$DATA" "$RUNS" "$LOGS"
export PYTHONUNBUFFERED=1
ROWS=()
T_START=$SECONDS

figure() {  # figure NAME LOG SPEC...: a history.jsonl key's last value, 'speed' (the log's last N x/s), or a regex
  "$PY" - "$RUNS/$1/history.jsonl" "$2" "${@:3}" <<'EOF'
import json, math, os, re, sys
history, log, *specs = sys.argv[1:]
rows = [json.loads(l) for l in open(history) if l.strip()] if os.path.exists(history) else []
text, parts = open(log).read(), []
for spec in specs:
    if spec == 'speed':  # common.log_step: "..., X ms/step, 1,234 tok/s, eta ..."; sample.py: "(1234 tok/s)"
        found = re.findall(r'([\d,]+ (?:tok|pairs|rollouts)/s)', text)[-1:]
    elif '(' in spec:  # a regex: every match, its groups joined by ': '
        found = [m if isinstance(m, str) else ': '.join(m) for m in re.findall(spec, text, re.M)]
    else:  # a history.jsonl key: its last value
        values = [r[spec] for r in rows if spec in r]
        if values and not math.isfinite(values[-1]):
            sys.exit(f"{spec} is {values[-1]} in {history}")
        found = [f"{spec} {values[-1]:.1f}%" if spec.endswith('mfu') else f"{spec} {values[-1]:.4g}"] if values else []
    if not found:
        sys.exit(f"{spec!r} not found in {history if spec != 'speed' and '(' not in spec else log}")
    parts += found
print('; '.join(parts) or '-')
EOF
}

step() {  # step NAME [SPEC...] -- command...: run it (timed, logged), then add its row to the table
  local name=$1 specs=() rc=0 fig t0=$SECONDS log=$LOGS/$1.log
  shift
  while (($#)) && [[ $1 != -- ]]; do specs+=("$1"); shift; done
  shift
  echo "=== $name: $*" | tee "$log"
  timeout -k 15 "${STEP_TIMEOUT:-300}" "$@" >>"$log" 2>&1 || rc=$?
  if ((rc == 0)); then
    fig=$(figure "$name" "$log" "${specs[@]}" 2>&1) || rc=$?
  elif ((rc == 124)); then
    fig="timed out after ${STEP_TIMEOUT:-300} s"
  else
    fig="exit code $rc"
  fi
  if ((rc != 0)); then
    printf '\nFAILED: %s (%s)\ncommand:' "$name" "$fig" >&2
    printf ' %q' "$@" >&2
    printf '\n--- last 40 lines of %s:\n' "$log" >&2
    tail -n 40 "$log" >&2
    exit 1
  fi
  echo "    ok, $((SECONDS - t0)) s: $fig"
  ROWS+=("$name|$((SECONDS - t0))|$fig")
}

if command -v torchrun >/dev/null; then TORCHRUN=(torchrun); else TORCHRUN=("$PY" -m torch.distributed.run); fi
GPU=(--device=cuda --dtype=bfloat16 --data_root="$DATA")
TINY=(--max_iters=60 --lr_decay_iters=60 --eval_interval=60 --eval_iters=10 --log_interval=10 --warmup_iters=5)

step env '^cuda: (.*)' -- "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible to torch'; \
print(f'cuda: torch {torch.__version__}, CUDA {torch.version.cuda}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}')"
NGPU=${NGPU:-$("$PY" -c 'import torch; print(torch.cuda.device_count())')}

# data, as pipeline.py prepares it: the task suite, then the stdlib corpus -> BPE -> token shards
step prepare_tasks -- "$PY" prepare.py --write_tasks=True --data_root="$DATA"
step prepare 'train\.bin ([\d,]+ tokens)' -- "$PY" prepare.py --data_root="$DATA"

# the big run: GPT-2-small class, 200 steps of 4 x 16 x 1024 tokens, bf16, compiled; then generation speed
step pretrain_small val/loss train/mfu speed -- "$PY" train.py config/pretrain_small.py "${GPU[@]}" --compile_model=True \
  --dataset=stdlib --out_dir="$RUNS/pretrain_small" --wandb_log=False --max_iters=200 --lr_decay_iters=200 \
  --warmup_iters=20 --eval_interval=200 --eval_iters=10 --log_interval=10 --gradient_accumulation_steps=4
step generate speed -- "$PY" sample.py --out_dir="$RUNS/pretrain_small" --device=cuda --dtype=bfloat16 \
  --start="def " --num_samples=8 --max_new_tokens=256
step bench_generate '^(batch \d+): ours ([\d,]+ tok/s)' -- "$PY" bench/bench_generate.py --device=cuda --n_layer=12 \
  --n_head=12 --n_kv_head=4 --n_embd=768 --new_tokens=256 --batch_sizes="(1, 8)" --nocache_batch_sizes="()"

# every stage's tiny config, each from the previous stage's out_dir (pipeline.py's STAGES)
step pretrain val/loss speed -- "$PY" train.py config/pretrain_tiny.py "${GPU[@]}" "${TINY[@]}" --out_dir="$RUNS/pretrain"
step sft val/loss speed -- "$PY" sft.py config/sft_tiny.py "${GPU[@]}" "${TINY[@]}" --init_from="$RUNS/pretrain" \
  --out_dir="$RUNS/sft" --eval_items_per_task=20
step reward val/loss val/accuracy speed -- "$PY" reward.py config/reward_tiny.py "${GPU[@]}" --init_from="$RUNS/sft" \
  --out_dir="$RUNS/reward" --max_iters=40 --lr_decay_iters=40 --eval_interval=40 --log_interval=10 --eval_pairs=200
step dpo val/loss val/rewards/accuracies speed -- "$PY" dpo.py config/dpo_tiny.py "${GPU[@]}" --init_from="$RUNS/sft" \
  --out_dir="$RUNS/dpo" --max_iters=20 --lr_decay_iters=20 --eval_interval=20 --log_interval=5 --eval_pairs=200 \
  --eval_items_per_task=20
step ppo objective/scores val/arith_acc speed -- "$PY" ppo.py config/ppo_tiny.py "${GPU[@]}" --init_from="$RUNS/sft" \
  --reward_model="$RUNS/reward" --critic_init=reward --verifiable_weight=0 --reward_model_weight=1 \
  --out_dir="$RUNS/ppo" --max_iters=4 --eval_interval=4 --log_interval=1 --eval_items_per_task=20
step grpo objective/scores val/arith_acc speed -- "$PY" ppo.py config/grpo_tiny.py "${GPU[@]}" --init_from="$RUNS/sft" \
  --out_dir="$RUNS/grpo" --max_iters=4 --eval_interval=4 --log_interval=1 --eval_items_per_task=20

# distributed: torchrun on one GPU, on all of them, and FSDP (gradient_accumulation_steps must divide by ranks)
step torchrun_1 val/loss speed -- "${TORCHRUN[@]}" --standalone --nproc_per_node=1 train.py config/pretrain_tiny.py \
  "${GPU[@]}" "${TINY[@]}" --out_dir="$RUNS/torchrun_1"
if ((NGPU > 1)); then
  step "torchrun_$NGPU" val/loss speed -- "${TORCHRUN[@]}" --standalone --nproc_per_node="$NGPU" train.py \
    config/pretrain_tiny.py "${GPU[@]}" "${TINY[@]}" --gradient_accumulation_steps="$NGPU" --out_dir="$RUNS/torchrun_$NGPU"
fi
if grep -q "^parallel = " train.py; then
  step fsdp val/loss speed -- "${TORCHRUN[@]}" --standalone --nproc_per_node="$NGPU" train.py config/pretrain_tiny.py \
    "${GPU[@]}" "${TINY[@]}" --gradient_accumulation_steps="$NGPU" --parallel=fsdp --out_dir="$RUNS/fsdp"
else
  echo "fsdp: skipped (train.py has no parallel key)"
  ROWS+=("fsdp|-|skipped (train.py has no parallel key)")
fi

TOTAL=$((SECONDS - T_START))
{
  printf '\n%-16s %7s  %s\n' step seconds result
  for row in "${ROWS[@]}"; do IFS='|' read -r name secs fig <<<"$row"; printf '%-16s %7s  %s\n' "$name" "$secs" "$fig"; done
  printf '%-16s %7s  %s\n' total "$TOTAL" "all steps passed on $NGPU GPU(s); logs in $LOGS"
  ((TOTAL <= 480)) || echo "WARNING: $TOTAL s is over the 8-minute target"
} | tee "$OUT/summary.txt"
