"""The subcommands of ``python -m llama3``, one module each, named for its subcommand: its flags
(``add_arguments(parser)``), and ``run(args) -> int``, which turns them into values, calls the
library that does the work and prints what a user reads. The libraries take values, not flags, and
raise errors in their own terms; ``python -m llama3`` names the flag that sets a setting at fault
(:func:`llama3.cli.flag_of`).

Training's commands live beside the training library (:mod:`llama3.training.train`,
:mod:`llama3.training.multitrain`), as do ``deploy`` (:mod:`llama3.deploy.command`) and
``lm_eval`` (:mod:`llama3.interop.lm_eval_cli`).
"""
