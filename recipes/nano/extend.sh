#!/usr/bin/env bash
# Continue a finished CPU run's stage 2 for more steps, then run stage 3, the held-out evaluation and
# the export again, in a new run directory that shares the old run's data, tokenizer and stage 1.
#
#   recipes/nano/extend.sh runs/nano runs/nano-ext 600                       # native
#   recipes/nano/extend.sh runs/nano-224 runs/nano-224-ext 600 --force-size 224
#
# Stage 2 restarts from the old run's stage-2 weights with a fresh optimizer, a 10-step warm-up and
# a cosine decay over the new steps (seed 11, so the sample order differs from the first pass).
set -euo pipefail
old=$1 new=$2 steps=$3
shift 3
here=$(cd "$(dirname "$0")" && pwd)
python=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${MKL_NUM_THREADS:-1}
mkdir -p "$new"
for shared in data tokenizer stage1; do
  [ -e "$new/$shared" ] || ln -s "$(cd "$old" && pwd)/$shared" "$new/$shared"
done
batch=(--seq_len 1024 --batch_size 4 --grad_accum 1 --eval_every 100 --save_every 50 --progress false)
data=(--data "$old/data/train/data.jsonl" --eval_data "$old/data/dev/data.jsonl")
"$python" -m qwen2vl train --config "$here/stage2.yaml" "${data[@]}" "${batch[@]}" \
  --model "$old/stage2/final" --output_dir "$new/stage2" --max_steps "$steps" --seed 11 --warmup_steps 10 --resume
"$python" -m qwen2vl train --config "$here/stage3.yaml" "${data[@]}" "${batch[@]}" \
  --model "$new/stage2/final" --output_dir "$new/stage3" --max_steps 40 --resume
"$python" "$here/train.py" cpu --out "$new" "$@"    # every stage is done: evaluation and export only
