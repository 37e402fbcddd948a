"""Train-state checkpoints (orbax) and the model directory a run may start from.

See ``train.start`` for the layout of a run directory and the start rules.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax

from moejax import checkpoint as mckpt
from train.config import TrainError
from train.start import CHECKPOINT_DIR


class Checkpoints:
    """Async, atomic train-state checkpoints under ``OUT/checkpoints`` (last ``keep`` kept).

    Each finished step is sealed (file sizes and checksums recorded, see
    ``moejax.checkpoint``) before the next save starts and when the run waits
    for its last save. Resuming takes the newest step that restores intact; a
    damaged newer one is reported in one line and renamed ``<step>.damaged``
    (kept for inspection, never deleted).
    """

    def __init__(self, out: Path, keep: int, async_save: bool):
        self.directory = out / CHECKPOINT_DIR
        self.manager = mckpt.train_state_manager(self.directory, keep=keep, async_save=async_save)

    def save(self, step: int, state: dict, meta: dict) -> None:
        mckpt.seal_finished_steps(self.manager)  # orbax would wait for the previous save anyway
        mckpt.save_train_state(self.manager, step, state, meta)

    def restore_latest(self, abstract_state: dict) -> tuple[int, dict, dict]:
        """(step, state, meta) of the newest intact checkpoint; damaged ones are set aside."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                state, meta = mckpt.restore_train_state(self.manager, step, abstract_state)
                return step, state, meta
            except mckpt.DamagedCheckpointError as err:
                self._set_aside(step, err)
            except (mckpt.ShapeMismatchError, KeyError, TypeError) as err:
                self.close()
                raise TrainError(f"checkpoint {self.directory / str(step)} does not match the model "
                                 f"built from config.json ({_first_line(err)})") from None
        self.close()
        raise TrainError(f"no intact checkpoint left in {self.directory} (damaged ones were renamed "
                         f"*.damaged); run again to start from the model in the run directory, "
                         f"or from scratch")

    def _set_aside(self, step: int, err: Exception) -> None:
        path = self.directory / str(step)
        target = path.with_name(f"{step}.damaged")
        n = 1
        while target.exists():
            target, n = path.with_name(f"{step}.damaged.{n}"), n + 1
        if jax.process_index() == 0:
            path.rename(target)
        self.manager.reload()
        print(f"warning: checkpoint step {step} is damaged ({_first_line(err)}); renamed it "
              f"{target.name} and trying the one before", file=sys.stderr, flush=True)

    def steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def wait(self) -> None:
        mckpt.seal_finished_steps(self.manager)

    def close(self) -> None:
        self.manager.close()


def restore_model_dir(out: Path, abstract_state: dict) -> dict:
    try:
        return mckpt.restore_model_variables(out, abstract_state)
    except mckpt.DamagedCheckpointError as err:
        raise TrainError(f"the model in {out}/model is damaged: {_first_line(err)}; restore it "
                         f"or use another --out") from None
    except (ValueError, KeyError, TypeError) as err:
        raise TrainError(f"the model in {out}/model does not match its config.json "
                         f"({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:300] if text else type(err).__name__

