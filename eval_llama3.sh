#!/usr/bin/env bash
# Evaluate a trained checkpoint: loss, perplexity and bits per byte on the eval corpus.
#
# Usage: ./eval_llama3.sh [extra flags for `python -m llama3 evaluate`]
#
# Edit the variables below, or set them in the environment:
#   CHECKPOINT    run directory written by train_llama3.sh (its latest step), or a step directory
#   TOKENIZER     the SentencePiece model the checkpoint was trained with
#   EVAL_CORPUS   preprocessed eval split
#   BATCH_SIZE    windows per batch
#   TOTAL_STEPS   batches to evaluate (0 = the whole eval set, which can take a while)
#   OUTPUT        JSON file for the results ("" = print only)
#   PRECISION_FLAGS  e.g. "--amp_bf16" on a GPU
set -euo pipefail
CHECKPOINT="${CHECKPOINT:-checkpoints/softplus_coreauto_seq4096}"
TOKENIZER="${TOKENIZER:-tokenizer/llama3_bpe_2048.model}"
EVAL_CORPUS="${EVAL_CORPUS:-/workspace/Datasets/ThePile/pretrain_data/eval}"
BATCH_SIZE="${BATCH_SIZE:-64}"
TOTAL_STEPS="${TOTAL_STEPS:-100}"
OUTPUT="${OUTPUT:-}"
PRECISION_FLAGS="${PRECISION_FLAGS:---amp_bf16}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
require_path "$CHECKPOINT" CHECKPOINT "checkpoint"
require_path "$TOKENIZER" TOKENIZER "tokenizer"
require_path "$EVAL_CORPUS" EVAL_CORPUS "eval corpus"
output_flags=()
[[ -z "$OUTPUT" ]] || output_flags=(--output "$OUTPUT")

# shellcheck disable=SC2086  # PRECISION_FLAGS is a word list
"$(pick_python)" -m llama3 evaluate \
  --from_checkpoint "$CHECKPOINT" --tokenizer "$TOKENIZER" --eval_corpus "$EVAL_CORPUS" \
  --batch_size "$BATCH_SIZE" --eval_batches "$TOTAL_STEPS" $PRECISION_FLAGS "${output_flags[@]}" "$@"
