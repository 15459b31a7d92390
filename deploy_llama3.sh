#!/usr/bin/env bash
# Deploy a trained checkpoint: ONNX export, ONNX Runtime accuracy check, TensorRT engine (when
# TensorRT is installed), and latency/throughput measurements.
#
# Usage: ./deploy_llama3.sh [extra flags for `python -m llama3 deploy`]
#
# Edit the variables below, or set them in the environment:
#   CHECKPOINT    run directory written by train_llama3.sh, or a step directory
#   TOKENIZER     the SentencePiece model the checkpoint was trained with
#   EVAL_CORPUS   preprocessed eval split, for the accuracy check
#   OUTPUT_DIR    where model.onnx, the TensorRT engine and the report go
#   BATCH_SIZE    batch of the optimisation profile and of the latency measurement
#   MAX_SEQ_LEN   query length of the latency measurement ("" = the checkpoint's context)
#   PRECISION     TensorRT precision: fp32, fp16 or bf16 (TensorRT 10.x and 11.x are supported;
#                 11 builds fp16/bf16 from an ONNX file exported in that dtype)
#   STRONGLY_TYPED  1: on TensorRT 10 too, take fp16/bf16 from the exported graph instead of the
#                 builder flags ("" = TensorRT 10's builder flags)
set -euo pipefail
CHECKPOINT="${CHECKPOINT:-checkpoints/softplus_coreauto_seq4096}"
TOKENIZER="${TOKENIZER:-tokenizer/llama3_bpe_2048.model}"
EVAL_CORPUS="${EVAL_CORPUS:-/workspace/Datasets/ThePile/pretrain_data/eval}"
OUTPUT_DIR="${OUTPUT_DIR:-deployed/softplus_coreauto_seq4096}"
BATCH_SIZE="${BATCH_SIZE:-64}"
MAX_SEQ_LEN="${MAX_SEQ_LEN:-}"
PRECISION="${PRECISION:-fp16}"
STRONGLY_TYPED="${STRONGLY_TYPED:-}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
require_path "$CHECKPOINT" CHECKPOINT "checkpoint"
require_path "$TOKENIZER" TOKENIZER "tokenizer"
require_path "$EVAL_CORPUS" EVAL_CORPUS "eval corpus"
seq_flags=()
[[ -z "$MAX_SEQ_LEN" ]] || seq_flags=(--seq_len "$MAX_SEQ_LEN")
typing_flags=()
[[ -z "$STRONGLY_TYPED" ]] || typing_flags=(--strongly_typed)

"$(pick_python)" -m llama3 deploy \
  --from_checkpoint "$CHECKPOINT" --tokenizer "$TOKENIZER" --eval_corpus "$EVAL_CORPUS" \
  --export_dir "$OUTPUT_DIR" --batch_size "$BATCH_SIZE" --precision "$PRECISION" \
  "${seq_flags[@]}" "${typing_flags[@]}" "$@"
