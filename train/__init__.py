"""The moejax training application: ``python -m train`` (see ``train/cli.py``).

Modules: ``config`` (TrainConfig), ``data`` (corpora, batches), ``optim``
(AdamW, schedule, parameter groups), ``step`` (the pure train/eval steps and
their shardings), ``state`` (building/restoring the train state),
``start`` (the run directory, start rules and the jax-free preflight of
flags, paths and data), ``checkpointing`` (orbax checkpoints, sealed; damaged
ones set aside), ``loop`` (the loop),
``metrics``/``summary``/``plot`` (outputs), ``runtime`` (distributed, mesh,
signals).
"""

from train.config import TrainConfig, TrainError

__all__ = ["TrainConfig", "TrainError", "main"]


def main(argv=None) -> int:
    from train.cli import main as cli_main
    return cli_main(argv)
