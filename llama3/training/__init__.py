"""Training: one loop for one process (``train``) and for many under torchrun (``multitrain``).

- :mod:`~llama3.training.flags` the flag groups of both commands and the frozen configuration
  (:class:`~llama3.training.flags.TrainingConfig`) they become;
- :mod:`~llama3.training.build` tokenizer, model, optimiser and data from the configuration, and
  the restore of a resumed run;
- :mod:`~llama3.training.state` the run's mutable progress and the pieces of state a checkpoint
  keeps;
- :mod:`~llama3.training.trainer` the loop: steps, evaluation, checkpoints, interruption;
- :mod:`~llama3.training.checkpoints` the loop's saves, at once or in the background, and how
  long each held training up;
- :mod:`~llama3.training.step` one optimizer step: accumulation, loss normalisation, clipping;
- :mod:`~llama3.training.parallel` activation checkpointing → compile → FSDP2;
- :mod:`~llama3.training.distributed` the processes and their collectives;
- :mod:`~llama3.training.optim` AdamW, learning-rate schedule, gradient norms;
- :mod:`~llama3.training.guard` the stop on non-finite losses and gradients;
- :mod:`~llama3.training.metrics` progress bar, metrics.jsonl, TensorBoard, MFU, summary;
- :mod:`~llama3.training.interrupt` Ctrl-C and SIGTERM stop at a step boundary, with a checkpoint.
"""
