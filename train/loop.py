"""The training loop.

1. Set up: distributed runtime, mesh, corpus, start point (fresh / model /
   checkpoint), train state on the mesh, jitted steps.
2. For each step: this host's rows of the batch for ``step`` -> train step.
   The host reads step i's metrics while step i+1 runs (one step of
   pipelining) and stops on a non-finite loss, gradient or parameter.
3. Every ``log_every`` steps a metrics record; every ``eval_every`` the
   validation loss (nats/token and bits/byte); every ``checkpoint_every``,
   at the end, and on SIGTERM/SIGINT an async checkpoint.
4. At the end: the final model (OUT/config.json + OUT/model/), the PNG, the
   summary.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import numpy as np

from moejax import checkpoint as mckpt
from moejax.moe import moe_backends
from train import data as data_lib
from train.checkpointing import Checkpoints
from train.config import NonFiniteError, TrainConfig, TrainError
from train.metrics import MetricsLog, Progress, format_duration, read_records
from train.optim import lr_schedule
from train.plot import PLOT_NAME, plot_run
from train.start import StartPoint
from train.runtime import StopSignal, build_mesh, maybe_initialize_distributed
from train.state import build_state, parameter_counts
from train.summary import print_summary, summarize, write_summary
from train.step import batch_parallelism, jit_eval_step, jit_train_step

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}


class Trainer:
    def __init__(self, cfg: TrainConfig, corpus: data_lib.Corpus, start: StartPoint):
        """``corpus`` and ``start`` come from ``train.start.preflight(cfg)``."""
        self.cfg, self.out = cfg, Path(cfg.out)
        maybe_initialize_distributed()
        self.mesh = build_mesh(cfg.mesh)
        if cfg.batch_size % batch_parallelism(self.mesh):
            raise TrainError(f"--batch-size {cfg.batch_size} must be divisible by the mesh's "
                             f"batch parallelism data*fsdp*expert = {batch_parallelism(self.mesh)}")
        self.primary = jax.process_index() == 0
        self.corpus = corpus
        host = (jax.process_index(), jax.process_count())
        self.sampler = data_lib.BatchSampler(self.corpus.train, cfg.batch_size, cfg.seq_len,
                                             cfg.seed, *host)
        self.val = data_lib.eval_batches(self.corpus.val, cfg.batch_size, cfg.seq_len,
                                         cfg.eval_batches, *host)
        self.start = start
        self.model_cfg = self.start.model_cfg
        resuming = self.start.kind == "checkpoint"
        self.checkpoints = Checkpoints(self.out, cfg.keep, cfg.async_checkpoint) if resuming else None
        self.state = build_state(cfg, self.start, self.mesh, self.checkpoints,
                                 (cfg.batch_size, cfg.seq_len + 1))
        # nothing is written before the state exists (bad --param-group, damaged model/)
        self.out.mkdir(parents=True, exist_ok=True)
        if self.primary and self.start.kind == "fresh":
            mckpt.save_config(self.out, self.model_cfg)
        if self.checkpoints is None:
            self.checkpoints = Checkpoints(self.out, cfg.keep, cfg.async_checkpoint)
        self._warn_if_resumed_differently()
        self.train_step = jit_train_step(self.state.graphdef, self.state.tx, self.state.shardings)
        self.eval_step = jit_eval_step(self.state.graphdef, self.state.shardings)
        self.schedule = jax.jit(lr_schedule(cfg))  # one compile, not one per jnp op
        if self.primary:  # its tokenizer is the model's (serve export reads it): the resolved one
            tmp = self.out / "train_config.json.tmp"  # atomic: a torn file would lose the tokenizer
            tmp.write_text(cfg.replace(tokenizer=self.corpus.tokenizer).to_json())
            tmp.replace(self.out / "train_config.json")
        self.log = MetricsLog(self.out, self.state.step, cfg.tensorboard, self.primary)
        self.progress = Progress(cfg.steps, self.state.step, enabled=self.primary)

    # -- pieces ---------------------------------------------------------------
    def _warn_if_resumed_differently(self) -> None:
        changed = resume_differences(self.state.meta, self.cfg, self.corpus.fingerprint())
        if changed:
            print(f"note: {', '.join(changed)} {'differs' if len(changed) == 1 else 'differ'} from "
                  f"the checkpoint's; the batches will differ from an uninterrupted run")

    def _device_batch(self, rows_BS1: np.ndarray) -> jax.Array:
        return jax.make_array_from_process_local_data(self.state.shardings.batch, rows_BS1)

    def evaluate(self) -> dict:
        s = self.state
        losses = [self.eval_step(s.params, s.nonparam, self._device_batch(b)) for b in self.val]
        val_loss = float(np.mean(jax.device_get(losses)))
        record = {"val_loss": val_loss}
        if self.corpus.bytes_per_token:
            record["val_bpb"] = val_loss / math.log(2) / self.corpus.bytes_per_token
        return record

    def _save(self, step: int) -> None:
        meta = {"step": step, "seed": self.cfg.seed, "data": self.corpus.fingerprint(),
                "batch_size": self.cfg.batch_size, "seq_len": self.cfg.seq_len,
                "tokens_seen": tokens_seen(self.state.meta, self.state.step, step, self.cfg),
                "model": self.model_cfg.name}
        self.checkpoints.save(step, self.state.checkpoint_tree(), meta)

    def _eval_line(self, step: int, record: dict) -> str:
        bpb = f", {record['val_bpb']:.3f} bits/byte" if "val_bpb" in record else ""
        return f"step {step}: val loss {record['val_loss']:.4f} nats/token{bpb}"

    # -- the loop -------------------------------------------------------------
    def run(self) -> int:
        cfg, s = self.cfg, self.state
        self._banner()
        if s.step >= cfg.steps:
            print(f"{self.out} is already at step {s.step} >= --steps {cfg.steps}: nothing to train "
                  f"(raise --steps to continue, or use another --out to start over)")
            return self._finish(s.step, time.perf_counter(), trained=0)
        if s.step == 0:
            self._initial_eval()
        pending, window = None, []
        t_loop = t_start = t_log = time.perf_counter()   # after the first evaluation: not in step 1's time
        paused = 0.0     # seconds spent evaluating and checkpointing: not training, not in tokens/s
        first = self.first_step = s.step
        with StopSignal() as stop:
            for step in range(s.step, cfg.steps):
                done = step + 1
                batch = self._device_batch(self.sampler.batch(step))
                s.params, s.opt_state, s.nonparam, metrics = self.train_step(
                    s.params, s.opt_state, s.nonparam, batch)
                if pending is not None:
                    window.append(self._check(*pending))
                pending = (done, metrics)
                if step == first:  # compile + first step: keep it out of tokens/s
                    jax.block_until_ready(metrics)
                    t_start = t_log = time.perf_counter()
                    self.progress.line(f"compiled and ran step {done} in "
                                       f"{format_duration(t_start - t_loop)}")
                boundary = (done % cfg.log_every == 0 or done % cfg.eval_every == 0 or
                            done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.received)
                if not boundary:
                    continue
                window.append(self._check(*pending))
                pending = None
                t_now = time.perf_counter()
                self._log(done, window, t_now - t_log,
                          (t_now - t_start - paused) / max(done - first - 1, 1))
                if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.received:
                    self._save(done)
                window, t_log = [], time.perf_counter()
                paused += t_log - t_now
                if stop.received:
                    return self._stopped(done, stop.received)
        return self._finish(cfg.steps, t_start, trained=cfg.steps - first, paused_s=paused)

    def _check(self, done: int, metrics) -> dict:
        host = jax.device_get(metrics)
        if not host["finite"]:
            loss, grad_norm = float(host["total_loss"]), float(host["grad_norm"])
            if math.isfinite(loss) and math.isfinite(grad_norm):
                raise NonFiniteError(f"non-finite parameters after the update of step {done}, from a "
                                     f"finite loss ({loss}) and gradient norm ({grad_norm}): too "
                                     f"large an --lr?")
            raise NonFiniteError(f"non-finite loss ({loss}) or gradient norm ({grad_norm}) at step {done}")
        host["step"] = done
        return host

    def _log(self, done: int, window: list[dict], interval_s: float, step_time: float) -> None:
        cfg = self.cfg
        mean = lambda key: float(np.mean([m[key] for m in window]))  # noqa: E731
        timed = [m for m in window if m["step"] > self.first_step + 1]  # not the compile step
        record = {"step": done, "loss": mean("loss"), "total_loss": mean("total_loss"),
                  "aux_loss": mean("aux_loss"), "z_loss": mean("z_loss"),
                  "router_loss": mean("router_loss"), "dropped_fraction": mean("dropped_fraction"),
                  "grad_norm": mean("grad_norm"), "lr": float(self.schedule(done - 1)),
                  "tokens_per_s": (len(timed) * cfg.tokens_per_step / interval_s
                                   if timed and interval_s > 0 else None),
                  "expert_load": np.mean([m["expert_load"] for m in window], axis=0)}
        self.progress.bar(done, record["loss"], record["tokens_per_s"], step_time)
        if record["tokens_per_s"] is None:
            del record["tokens_per_s"]
        if done % cfg.eval_every == 0 or done == cfg.steps:
            record.update(self.evaluate())
            self.progress.line(self._eval_line(done, record))
        self.log.write(record)

    def _initial_eval(self) -> None:
        s = self.state
        first = self._device_batch(self.sampler.batch(0))
        record = {"step": 0, "loss": float(self.eval_step(s.params, s.nonparam, first))}
        record.update(self.evaluate())
        self.progress.line(self._eval_line(0, record))
        self.log.write(record)

    def _banner(self) -> None:
        cfg, s = self.cfg, self.state
        total, active = parameter_counts(self.model_cfg, s.params)
        how = {"fresh": "fresh start", "model": f"weights from {self.out}/model, fresh optimizer",
               "checkpoint": f"resuming from checkpoint step {s.step}"}[self.start.kind]
        self.progress.line(
            f"model {self.model_cfg.name}: {total / 1e6:.2f}M params ({active / 1e6:.2f}M active), "
            f"compute {self.model_cfg.dtype}, layers {'scanned' if self.model_cfg.scan_layers else 'unrolled'}"
            f", remat {self.model_cfg.remat}; {how}\n"
            f"data {self.corpus.description}: {len(self.corpus.train):,} train / "
            f"{len(self.corpus.val):,} val tokens, vocab {self.corpus.vocab_size}\n"
            f"mesh {dict(self.mesh.shape)} on {jax.device_count()} {jax.default_backend()} "
            f"device(s); {cfg.steps} steps of {cfg.batch_size}x{cfg.seq_len} tokens -> {self.out}")
        if self.model_cfg.moe is not None:
            self.progress.line(moe_backends(self.model_cfg.moe, self.mesh, s.shardings.rules))

    def _stopped(self, done: int, signame: str) -> int:
        self.checkpoints.wait()
        self.progress.line(f"{signame}: saved checkpoint at step {done} in "
                           f"{self.checkpoints.directory}; run the same command again to resume")
        self.close()
        return EXIT_SIGNAL[signame]

    def _finish(self, step: int, t_start: float, trained: int, paused_s: float = 0.0) -> int:
        wall = time.perf_counter() - t_start
        self.checkpoints.wait()
        mckpt.save_model(self.out, self.state.model(), self.model_cfg)
        self.close()
        if not self.primary:
            return 0
        records = read_records(self.out / "metrics.jsonl")
        plot = (plot_run(records, self.out / PLOT_NAME, f"{self.model_cfg.name} on "
                         f"{Path(self.corpus.description.split(' (')[0]).name}")
                if self.cfg.plot else None)
        # the first step (compile) is outside ``wall``, evaluations and saves are in ``paused_s``:
        # neither is counted in tokens/s
        summary = summarize(records, step, wall, wall - paused_s, trained, self.cfg.tokens_per_step)
        write_summary(self.out / "summary.json", summary)
        print_summary(summary, self.out, plot, self.checkpoints.steps(), self.log.tb is not None)
        return 0

    def close(self) -> None:
        self.checkpoints.close()
        self.log.close()


def resume_differences(meta: dict, cfg: TrainConfig, data_fingerprint: str) -> list[str]:
    """The flags whose values differ from those of the checkpoint ``meta`` and change the
    batches (checkpoints from before the batch shape was recorded: taken as unchanged)."""
    if not meta:
        return []
    saved_and_now = {"--seed": (meta.get("seed"), cfg.seed),
                     "--data": (meta.get("data"), data_fingerprint),
                     "--batch-size": (meta.get("batch_size", cfg.batch_size), cfg.batch_size),
                     "--seq-len": (meta.get("seq_len", cfg.seq_len), cfg.seq_len)}
    return [flag for flag, (saved, now) in saved_and_now.items() if saved != now]


def tokens_seen(meta: dict, start_step: int, step: int, cfg: TrainConfig) -> int:
    """Training tokens up to ``step``: the checkpoint's count plus this run's steps (the
    batch shape may have changed at the resume)."""
    before = meta.get("tokens_seen", start_step * cfg.tokens_per_step)
    return before + (step - start_step) * cfg.tokens_per_step


def run(cfg: TrainConfig, corpus: data_lib.Corpus, start: StartPoint) -> int:
    trainer = Trainer(cfg, corpus, start)
    try:
        return trainer.run()
    except NonFiniteError as err:
        trainer.checkpoints.wait()
        steps = trainer.checkpoints.steps()
        keep = (f"the last good checkpoint is step {max(steps)} in {trainer.checkpoints.directory}"
                if steps else "no checkpoint was written")
        trainer.close()
        raise NonFiniteError(f"{err}; stopped, {keep}") from None
