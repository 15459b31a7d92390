#!/usr/bin/env bash
# Generate text from a trained checkpoint. A pretrained model continues text; it is not a chatbot,
# and an undertrained one produces gibberish.
#
# Usage: ./generate_llama3.sh [extra flags for `python -m llama3 generate`]
#
# Edit the variables below, or set them in the environment:
#   CHECKPOINT      run directory written by train_llama3.sh, or a step directory
#   TOKENIZER       the SentencePiece model the checkpoint was trained with
#   PROMPTS         prompts separated by '|' (generated together as one batch)
#   MAX_NEW_TOKENS  tokens to generate per prompt
#   NUCLEUS_PROB    top-p: sample from the smallest set of tokens with this much probability
#   TEMPERATURE     softmax temperature (0 = greedy)
#   SEED            sampling seed
set -euo pipefail
CHECKPOINT="${CHECKPOINT:-checkpoints/softplus_coreauto_seq4096}"
TOKENIZER="${TOKENIZER:-tokenizer/llama3_bpe_2048.model}"
PROMPTS="${PROMPTS:-the patients were treated with|in this study we}"
MAX_NEW_TOKENS="${MAX_NEW_TOKENS:-100}"
NUCLEUS_PROB="${NUCLEUS_PROB:-0.9}"
TEMPERATURE="${TEMPERATURE:-0.8}"
SEED="${SEED:-0}"

cd "$(dirname "$0")"
source scripts/common.sh
handle_help "$@"
require_path "$CHECKPOINT" CHECKPOINT "checkpoint"
require_path "$TOKENIZER" TOKENIZER "tokenizer"
prompt_flags=()
IFS='|' read -r -a prompts <<< "$PROMPTS"
for p in "${prompts[@]}"; do prompt_flags+=(--prompt "$p"); done

"$(pick_python)" -m llama3 generate \
  --from_checkpoint "$CHECKPOINT" --tokenizer "$TOKENIZER" "${prompt_flags[@]}" \
  --max_new_tokens "$MAX_NEW_TOKENS" --nucleus_prob "$NUCLEUS_PROB" --temperature "$TEMPERATURE" \
  --seed "$SEED" "$@"
