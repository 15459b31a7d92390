#!/usr/bin/env bash
# Train a Llama 3 model in one process (one GPU, or the CPU when there is none).
#
# Usage: ./train_llama3.sh [extra flags for `python -m llama3 train`]
#
# Edit the variables below, or set them in the environment. MAX_SEQ_LENS and CORE_DIMS take
# space-separated lists: one run per combination, each in its own directory under CHECKPOINT_ROOT.
#   TRAIN_CORPUS, EVAL_CORPUS   preprocessed train/eval splits (directories of shards)
#   TOKENIZER                   SentencePiece model written by train_tokenizer.sh
#   ATTENTION                   softplus or softmax
#   N_LAYERS, DIM               model depth and width
#   N_HEADS, N_KV_HEADS         softmax heads and key/value heads
#   CORE_DIMS                   softplus core widths ("" = the heuristic, 424 for dim 128)
#   CORE_OUTPUT_SCALE           softplus: width (core output × min(1, DIM/core width)) or none
#                               (the original's model, without the scale)
#   MAX_SEQ_LENS                context lengths
#   BATCH_SIZE                  windows per optimizer step (per GPU), split into ACCUMULATION_STEPS
#   TOTAL_STEPS, EVAL_STEPS, EVAL_BATCHES, SAVE_STEPS   step counts
#   BASE_LR, WD_RATE, DROPOUT   optimisation
#   PRECISION_FLAGS             e.g. "--amp_bf16 --allow_tf32" (GPU), "" for fp32
#   CHECKPOINT_ROOT             where run directories (checkpoints, metrics) are written
#   RESUME                      auto (default): a run directory holding a checkpoint continues
#                               from its newest one, so rerunning the script after a stop or a
#                               crash goes on; "" starts every run anew (a used directory is
#                               then refused)
#   LAUNCHER                    the command that runs Python; multitrain_llama3.sh sets torchrun
set -euo pipefail
TRAIN_CORPUS="${TRAIN_CORPUS:-/workspace/Datasets/ThePile/pretrain_data/train}"
EVAL_CORPUS="${EVAL_CORPUS:-/workspace/Datasets/ThePile/pretrain_data/eval}"
TOKENIZER="${TOKENIZER:-tokenizer/llama3_bpe_2048.model}"
ATTENTION="${ATTENTION:-softplus}"
N_LAYERS="${N_LAYERS:-3}"
DIM="${DIM:-128}"
N_HEADS="${N_HEADS:-4}"
N_KV_HEADS="${N_KV_HEADS:-4}"
CORE_DIMS="${CORE_DIMS:-}"
CORE_OUTPUT_SCALE="${CORE_OUTPUT_SCALE:-width}"
MAX_SEQ_LENS="${MAX_SEQ_LENS:-4096}"
BATCH_SIZE="${BATCH_SIZE:-64}"
ACCUMULATION_STEPS="${ACCUMULATION_STEPS:-1}"
TOTAL_STEPS="${TOTAL_STEPS:-20000}"
EVAL_STEPS="${EVAL_STEPS:-500}"
EVAL_BATCHES="${EVAL_BATCHES:-20}"
SAVE_STEPS="${SAVE_STEPS:-1000}"
BASE_LR="${BASE_LR:-1e-3}"
WD_RATE="${WD_RATE:-0.1}"
DROPOUT="${DROPOUT:-0.0}"
PRECISION_FLAGS="${PRECISION_FLAGS:---amp_bf16 --allow_tf32}"
CHECKPOINT_ROOT="${CHECKPOINT_ROOT:-checkpoints}"
RESUME="${RESUME-auto}"
LAUNCHER="${LAUNCHER:-}"
SUBCOMMAND="${SUBCOMMAND:-train}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
require_path "$TRAIN_CORPUS" TRAIN_CORPUS "training corpus"
require_path "$EVAL_CORPUS" EVAL_CORPUS "eval corpus"
require_path "$TOKENIZER" TOKENIZER "tokenizer"
[[ -n "$LAUNCHER" ]] || LAUNCHER="$(pick_python)"
[[ -z "$RESUME" || "$RESUME" == auto ]] || die "RESUME must be auto or empty, got '$RESUME'"
resume_flags=()
[[ -z "$RESUME" ]] || resume_flags=(--from_checkpoint "$RESUME")

runs=$(( $(wc -w <<< "$MAX_SEQ_LENS") * $(wc -w <<< "${CORE_DIMS:-auto}") ))
n=0
for seq in $MAX_SEQ_LENS; do
  for core in ${CORE_DIMS:-auto}; do
    n=$((n + 1))
    if [[ "$ATTENTION" == softmax ]]; then
      name="softmax_h${N_HEADS}kv${N_KV_HEADS}_seq${seq}"
      model_flags=(--n_heads "$N_HEADS" --n_kv_heads "$N_KV_HEADS")
    else
      name="softplus_core${core}_seq${seq}"
      model_flags=(--core_output_scale "$CORE_OUTPUT_SCALE")
      [[ "$core" == auto ]] || model_flags+=(--core_dim "$core")
    fi
    echo "=== run ${name} -> ${CHECKPOINT_ROOT}/${name}"
    # The last run replaces this shell, so a signal to the job (SIGTERM from a scheduler, Ctrl-C)
    # reaches the launcher and the training processes, never a shell that would end before they
    # have saved their checkpoint.
    launch=()
    [[ $n -lt $runs ]] || launch=(exec)
    # shellcheck disable=SC2086  # LAUNCHER and PRECISION_FLAGS are word lists
    "${launch[@]}" $LAUNCHER -m llama3 "$SUBCOMMAND" \
      --train_corpus "$TRAIN_CORPUS" --eval_corpus "$EVAL_CORPUS" --tokenizer "$TOKENIZER" \
      --attention "$ATTENTION" --n_layers "$N_LAYERS" --dim "$DIM" "${model_flags[@]}" \
      --max_seq_len "$seq" --batch_size "$BATCH_SIZE" --accumulation_steps "$ACCUMULATION_STEPS" \
      --total_steps "$TOTAL_STEPS" --eval_steps "$EVAL_STEPS" --eval_batches "$EVAL_BATCHES" \
      --save_steps "$SAVE_STEPS" --base_lr "$BASE_LR" --wd_rate "$WD_RATE" --dropout "$DROPOUT" \
      $PRECISION_FLAGS --to_checkpoint "${CHECKPOINT_ROOT}/${name}" "${resume_flags[@]}" "$@"
  done
done
