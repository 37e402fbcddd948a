"""End-to-end runs of ``python -m train`` on a micro MoE model.

One reference run (uninterrupted) is shared by the tests: its metrics log,
its falling loss, bit-identical resumption after SIGKILL and SIGTERM, and a
run on an 8-device ``data=2,expert=4`` mesh that must follow the same loss
curve.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import signal
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax.checkpoint import MANIFEST, load_model
from train import data as data_lib
from train.step import lm_loss
from train_cli_helper import (MICRO, checkpoint_steps, run_train, save_micro_model, start_train,
                              wait_for_checkpoint)

STEPS, WARMUP, LR = 32, 4, 1e-2


def run_args(corpus: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(corpus), "--out", str(out), *MICRO, "--steps", str(STEPS),
            "--checkpoint-every", "4", "--log-every", "2", "--eval-every", "16",
            "--lr", str(LR), "--warmup-steps", str(WARMUP), "--no-plot", "--no-tensorboard", *extra]


@pytest.fixture(scope="session")
def reference_run(shared_dir, corpus_file) -> Path:
    """The uninterrupted run (made once per session, whichever worker asks first)."""
    out = shared_dir / "reference"
    with open(shared_dir / "reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "summary.json").exists():
            args = run_args(corpus_file, out)
            args = [a for a in args if a not in ("--no-plot", "--no-tensorboard")]
            result = run_train(args)
            assert result.returncode == 0, result.stderr
            (shared_dir / "reference.stdout").write_text(result.stdout)
    return out


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def expected_lr(step_index: int) -> float:
    """Warmup from 0 then cosine to 0.1 * LR at STEPS (independent of optax)."""
    if step_index < WARMUP:
        return LR * step_index / WARMUP
    progress = (step_index - WARMUP) / (STEPS - WARMUP)
    return LR * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def test_metrics_log_and_falling_validation_loss(reference_run, shared_dir):
    recs = records(reference_run)
    assert [r["step"] for r in recs] == list(range(0, STEPS + 1, 2))
    assert all("loss" in r and math.isfinite(r["loss"]) for r in recs)
    for r in recs[1:]:
        load = np.asarray(r["expert_load"])
        assert load.shape == (1, 4)
        np.testing.assert_allclose(load.sum(axis=1), 1.0, rtol=1e-5)  # fractions of assignments
        assert r["grad_norm"] > 0 and r["tokens_per_s"] > 0 and r["dropped_fraction"] == 0.0
        assert r["aux_loss"] >= 1.0 - 1e-5  # E * sum f_i P_i >= 1 with equality iff balanced
        np.testing.assert_allclose(r["lr"], expected_lr(r["step"] - 1), rtol=1e-5, atol=1e-9)
    evals = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 16, 32]
    np.testing.assert_allclose(evals[0]["val_bpb"], evals[0]["val_loss"] / math.log(2), rtol=1e-6)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5, evals
    summary = json.loads((reference_run / "summary.json").read_text())
    assert summary["final_val_bpb"] == pytest.approx(evals[-1]["val_bpb"])
    # the run's tokens/s counts training steps only, as each logged window does: the time of
    # evaluations and checkpoint saves between windows is left out of both
    timed = [r for r in recs[1:] if "tokens_per_s" in r]
    tokens = [(r["step"] - max(p["step"], 1)) * 8 * 32   # step 1 (the compile) is not timed
              for p, r in zip(recs, recs[1:]) if "tokens_per_s" in r]
    window_rate = sum(tokens) / sum(t / r["tokens_per_s"] for t, r in zip(tokens, timed))
    assert summary["tokens_per_s"] == pytest.approx(window_rate, rel=0.1)
    assert summary["wall_time_s"] > sum(tokens) / summary["tokens_per_s"]
    assert list((reference_run / "tb").glob("events.out.tfevents.*"))
    assert (reference_run / "training.png").stat().st_size > 10_000
    stdout = (shared_dir / "reference.stdout").read_text()
    assert "val loss" in stdout and "bits/byte" in stdout and "ETA" in stdout
    # the banner names the MoE dispatch backend, its grouped-matmul kernel and the exchange
    assert "moe dispatch auto: sorted dropless, gmm kernel xla (auto on cpu)" in stdout
    assert "expert parallelism: none" in stdout


def restored_state(out: Path, step: int):
    with ocp.CheckpointManager(out / "checkpoints") as manager:
        return manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]


def test_sigkill_then_sigterm_resume_is_bit_identical(reference_run, corpus_file, tmp_path):
    out = tmp_path / "run"
    args = run_args(corpus_file, out)

    first = start_train(args)
    killed_after = wait_for_checkpoint(first, out, after=0)
    first.send_signal(signal.SIGKILL)
    assert first.wait() == -signal.SIGKILL
    assert STEPS not in checkpoint_steps(out)

    second = start_train(args)
    resumed_from = max(checkpoint_steps(out))
    assert resumed_from >= killed_after
    wait_for_checkpoint(second, out, after=resumed_from)
    second.send_signal(signal.SIGTERM)
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 143, stderr
    assert f"resuming from checkpoint step {resumed_from}" in stdout
    assert "SIGTERM: saved checkpoint at step" in stdout
    assert STEPS not in checkpoint_steps(out)

    third = run_train(args)
    assert third.returncode == 0, third.stderr
    ours, theirs = restored_state(out, STEPS), restored_state(reference_run, STEPS)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    assert "resuming from checkpoint step" in third.stdout
    # Records average the steps since the previous record, so the one right after a
    # resume covers fewer steps; the final record and the evaluations are exact.
    ref = {r["step"]: r for r in records(reference_run)}
    ours_by_step = {r["step"]: r for r in records(out)}
    assert ours_by_step[STEPS]["loss"] == ref[STEPS]["loss"]
    for step in (16, 32):
        assert ours_by_step[step]["val_loss"] == ref[step]["val_loss"]


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
def test_damaged_newest_checkpoint_is_set_aside_and_the_run_ends_bit_identical(
        reference_run, corpus_file, tmp_path, sealed):
    """The reference run's newest checkpoint (step 32) loses half of its largest array
    file: resuming reports it in one line, renames it, resumes from step 28 and ends
    exactly where the uninterrupted run ended. Unsealed (a run killed before it sealed
    the step), the damage is found by restoring, which must be just as quiet."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    newest = out / "checkpoints" / str(STEPS)
    if not sealed:
        (newest / MANIFEST).unlink()
    array_file = max((p for p in (newest / "state").rglob("*") if p.is_file()),
                     key=lambda p: p.stat().st_size)
    os.truncate(array_file, array_file.stat().st_size // 2)

    result = run_train(run_args(corpus_file, out))
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"warning: checkpoint step {STEPS} is damaged"), \
        result.stderr
    assert f"resuming from checkpoint step {STEPS - 4}" in result.stdout
    assert (out / "checkpoints" / f"{STEPS}.damaged").is_dir()  # set aside, not deleted
    ours, theirs = restored_state(out, STEPS), restored_state(reference_run, STEPS)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bit-identical
    assert records(out)[-1] == records(reference_run)[-1] | {"tokens_per_s": records(out)[-1]["tokens_per_s"]}


def test_mesh_data2_expert4_matches_single_device(reference_run, corpus_file, tmp_path):
    out = tmp_path / "mesh"
    result = run_train(run_args(corpus_file, out, "--mesh", "data=2,expert=4"), devices=8)
    assert result.returncode == 0, result.stderr
    assert "'data': 2" in result.stdout and "'expert': 4" in result.stdout
    ref = {r["step"]: r for r in records(reference_run)}
    mesh = records(out)
    assert [r["step"] for r in mesh] == sorted(ref)
    # Same math, different float32 reduction order across 8 shards: the curves agree to
    # float32 round-off (~1e-7 relative here) amplified over 32 Adam steps.
    for r in mesh:
        np.testing.assert_allclose(r["loss"], ref[r["step"]]["loss"], rtol=1e-4)
        if "val_loss" in r:
            np.testing.assert_allclose(r["val_loss"], ref[r["step"]]["val_loss"], rtol=1e-4)


def test_out_holding_only_a_model_dir_starts_from_its_weights(reference_run, corpus_file,
                                                             tmp_path):
    """What ``python -m moejax.convert --out RUN`` leaves: config.json + model/ only.
    (``reference_run`` only warms the compilation cache: the step program is the same.)"""
    out = save_micro_model(tmp_path / "converted", seed=123)  # not the seed train would use
    model, _ = load_model(out)
    val_BS1 = data_lib.eval_batches(data_lib.load_corpus(str(corpus_file)).val, 8, 32, 1)[0]
    logits = jax.jit(lambda x: model(x)[0])(val_BS1[:, :-1])
    expected = float(lm_loss(logits, val_BS1[:, 1:]))

    result = run_train(run_args(corpus_file, out, "--resume"))
    assert result.returncode == 0, result.stderr
    assert "weights from" in result.stdout and "fresh optimizer" in result.stdout
    first = records(out)[0]
    assert first["step"] == 0
    np.testing.assert_allclose(first["val_loss"], expected, rtol=1e-5)
    assert checkpoint_steps(out)[-1] == STEPS


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(corpus_file, tmp_path):
    # lr 1e30: the warmup's first non-zero step makes the weights astronomically large, and
    # the step after it overflows
    out = tmp_path / "diverge"
    args = ["--data", str(corpus_file), "--out", str(out), *MICRO, "--steps", "8", "--lr", "1e30",
            "--warmup-steps", "4", "--checkpoint-every", "1", "--log-every", "1", "--no-plot",
            "--no-tensorboard"]
    result = run_train(args)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 3 and "Traceback" not in result.stderr
    assert len(lines) == 1 and "non-finite loss" in lines[0], result.stderr
    good = checkpoint_steps(out)
    assert good and f"last good checkpoint is step {good[-1]}" in lines[0]
    assert good[-1] < 8 and not (out / "model").exists()
    state = restored_state(out, good[-1])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state))
