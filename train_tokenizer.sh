#!/usr/bin/env bash
# Train the SentencePiece BPE tokenizer on the training corpus.
#
# Usage: ./train_tokenizer.sh [extra flags for `python -m llama3 train_tokenizer`]
#
# Edit the variables below, or set them in the environment:
#   TRAIN_CORPUS            preprocessed training split (a directory of shards) or .jsonl/.jsonl.zst files
#   MODEL_FILE              where the tokenizer model is written
#   VOCAB_SIZE              vocabulary size (special ids: unk 0, pad 1, bos 2, eos 3)
#   INPUT_SENTENCE_SIZE     sentences sampled from the corpus for training
#   N_MOST_FREQUENT_WORDS   most frequent words kept whole as user-defined symbols
#   MAX_SENTENCE_LENGTH     longest sentence (bytes) SentencePiece accepts
set -euo pipefail
TRAIN_CORPUS="${TRAIN_CORPUS:-/workspace/Datasets/ThePile/pretrain_data/train}"
MODEL_FILE="${MODEL_FILE:-tokenizer/llama3_bpe_2048.model}"
VOCAB_SIZE="${VOCAB_SIZE:-2048}"
INPUT_SENTENCE_SIZE="${INPUT_SENTENCE_SIZE:-2000000}"
N_MOST_FREQUENT_WORDS="${N_MOST_FREQUENT_WORDS:-128}"
MAX_SENTENCE_LENGTH="${MAX_SENTENCE_LENGTH:-16384}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
require_path "$TRAIN_CORPUS" TRAIN_CORPUS "training corpus"

"$(pick_python)" -m llama3 train_tokenizer \
  --train_corpus "$TRAIN_CORPUS" \
  --model_file "$MODEL_FILE" \
  --vocab_size "$VOCAB_SIZE" \
  --input_sentence_size "$INPUT_SENTENCE_SIZE" \
  --n_most_frequent_words "$N_MOST_FREQUENT_WORDS" \
  --max_sentence_length "$MAX_SENTENCE_LENGTH" \
  "$@"
