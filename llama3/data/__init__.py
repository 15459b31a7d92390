"""The data pipeline: raw corpus → cleaned train/eval shards → tokenizer → cached token shards →
training and evaluation windows.

- :mod:`llama3.data.sources` reads JSON-lines (plain, zstd, gzip) and parquet corpora and accounts
  for bad input;
- :mod:`llama3.data.preprocess` cleans and splits (the library of ``python -m llama3 preprocess``);
- :mod:`llama3.data.tokenizer` trains and wraps SentencePiece (that of ``python -m llama3
  train_tokenizer``) and checks a tokenizer against the checkpoint it is used with;
- :mod:`llama3.data.tokens` encodes a corpus once into memory-mapped token shards (that of
  ``python -m llama3 pretokenize``);
- :mod:`llama3.data.dataset` serves training and evaluation batches from those shards.

Their commands are in :mod:`llama3.commands`; nothing here parses flags.
"""
