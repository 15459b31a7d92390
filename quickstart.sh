#!/usr/bin/env bash
# The whole pipeline, end to end, on the CPU in a few minutes: builds a virtual environment, a
# corpus, a tokenizer, trains a small softplus-attention model, evaluates it, exports it to ONNX
# (checked in ONNX Runtime; TensorRT when installed), generates text, and plots the loss curves.
#
# Usage: ./quickstart.sh [--corpus PATH] [--out DIR] [--steps N]
#   --corpus PATH   your own .jsonl/.jsonl.zst file(s) or directory (one JSON object with a "text"
#                   field per line); default: the documentation that ships with Python, gathered
#                   offline into a JSON-lines corpus
#   --out DIR       where every artefact goes (default: quickstart_out)
#   --steps N       training steps (default: 300)
#
# Environment: TORCH_SPEC (default torch==2.13.0), PYTHON_BASE (default python3), VENV (default .venv)
set -euo pipefail
cd "$(dirname "$0")"
source scripts/common.sh

CORPUS=""
OUT="quickstart_out"
STEPS=300
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) print_usage; exit 0 ;;
    --corpus) CORPUS="${2:?--corpus needs a path}"; shift 2 ;;
    --out) OUT="${2:?--out needs a directory}"; shift 2 ;;
    --steps) STEPS="${2:?--steps needs a number}"; shift 2 ;;
    *) die "unknown argument $1 (see ./quickstart.sh --help)" ;;
  esac
done
[[ -z "$CORPUS" ]] || require_path "$CORPUS" --corpus "corpus"

start=$SECONDS
step() { printf '\n[%d/8] %s  (%ds elapsed)\n' "$1" "$2" $((SECONDS - start)); }

step 1 "environment"
py="$(ensure_venv "$VENV_EXTRAS")"
"$py" -c 'import llama3, torch; print(f"llama3 {llama3.__version__}, torch {torch.__version__}")'
mkdir -p "$OUT"
DATA="$OUT/pretrain_data"
TOKENIZER="$OUT/tokenizer.model"
RUN="$OUT/run"

step 2 "corpus and preprocessing"
if [[ -z "$CORPUS" ]]; then
  CORPUS="$OUT/corpus/python_docs.jsonl"
  "$py" -m llama3.data.python_docs --output "$CORPUS"
fi
"$py" -m llama3 preprocess --input "$CORPUS" --output "$DATA"

step 3 "tokenizer"
"$py" -m llama3 train_tokenizer --train_corpus "$DATA/train" --model_file "$TOKENIZER" \
  --vocab_size 2048

step 4 "training ($STEPS steps, 3 layers, dim 128, softplus core_dim 128, context 256)"
rm -rf "$RUN"
"$py" -m llama3 train --device cpu \
  --train_corpus "$DATA/train" --eval_corpus "$DATA/eval" --tokenizer "$TOKENIZER" \
  --attention softplus --n_layers 3 --dim 128 --core_dim 128 --max_seq_len 256 \
  --batch_size 16 --total_steps "$STEPS" --warmup_steps $((STEPS / 10)) --base_lr 3e-3 \
  --eval_steps 50 --eval_batches 4 --save_steps "$STEPS" --to_checkpoint "$RUN"

step 5 "evaluation on the whole eval split"
"$py" -m llama3 evaluate --device cpu --from_checkpoint "$RUN" --tokenizer "$TOKENIZER" \
  --eval_corpus "$DATA/eval" --batch_size 16 --eval_batches 0 --output "$OUT/eval.json"

step 6 "deployment: ONNX export, ONNX Runtime check, TensorRT if installed, latency"
"$py" -m llama3 deploy --device cpu --from_checkpoint "$RUN" --tokenizer "$TOKENIZER" \
  --eval_corpus "$DATA/eval" --export_dir "$OUT/deploy" --batch_size 4 --seq_len 256 \
  --accuracy_batches 2 --warmup 3 --iterations 20

step 7 "generation"
"$py" -m llama3 generate --device cpu --from_checkpoint "$RUN" --tokenizer "$TOKENIZER" \
  --prompt "the function returns" --prompt "a list of" --max_new_tokens 48 --seed 0

step 8 "loss curves"
"$py" -m llama3 plot "$RUN" --output "$OUT/loss_curves.png"

printf '\nDone in %ds. Artefacts:\n' $((SECONDS - start))
printf '  %-22s %s\n' \
  "corpus" "$CORPUS" \
  "train/eval splits" "$DATA/{train,eval}" \
  "tokenizer" "$TOKENIZER" \
  "checkpoints, metrics" "$RUN" \
  "evaluation" "$OUT/eval.json" \
  "ONNX model, report" "$OUT/deploy" \
  "loss curves" "$OUT/loss_curves.png"
