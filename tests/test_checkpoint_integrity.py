"""Damaged checkpoints are detected, named in one line, set aside, and never restored.

Train states are written by the training application's ``Checkpoints`` (orbax
manager + seal); each damage is applied to the newest step, and resuming must
return the step before it, bit-exact, with the damaged one renamed
``<step>.damaged``. Sealed steps are checked against their manifest; unsealed
ones (a process killed between finalize and seal) by restoring them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import checkpoint as mckpt
from train.checkpointing import Checkpoints
from train.config import TrainError

STATE = {"w": jnp.arange(64 * 64, dtype=jnp.float32).reshape(64, 64),
         "opt": {"mu": jnp.linspace(0.0, 1.0, 300), "count": jnp.asarray(7, jnp.int32)}}
ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), STATE)


def state_at(step: int) -> dict:
    return jax.tree.map(lambda x: x * step, STATE)


def largest_file(directory: Path) -> Path:
    return max((p for p in directory.rglob("*") if p.is_file() and p.name != mckpt.MANIFEST),
               key=lambda p: p.stat().st_size)


def flip_middle(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 16] = bytes(b ^ 0xFF for b in data[mid:mid + 16])
    path.write_bytes(bytes(data))


def array_file(step_dir: Path) -> Path:
    return largest_file(step_dir / "state" / "ocdbt.process_0")


# name -> (damage(step_dir), detectable without a manifest)
DAMAGE = {
    "array file truncated": (lambda d: os.truncate(array_file(d), array_file(d).stat().st_size // 2), True),
    "array file emptied": (lambda d: os.truncate(array_file(d), 0), True),
    "array file removed": (lambda d: array_file(d).unlink(), True),
    "array file bytes flipped": (lambda d: flip_middle(array_file(d)), False),
    "metadata truncated": (lambda d: os.truncate(d / "state" / "_METADATA", 20), True),
    "metadata garbage": (lambda d: (d / "state" / "_METADATA").write_bytes(b"\x00\xffnot json" * 9), True),
    "metadata emptied": (lambda d: os.truncate(d / "state" / "_METADATA", 0), True),
    "ocdbt manifest emptied": (lambda d: os.truncate(d / "state" / "manifest.ocdbt", 0), True),
    "meta item garbage": (lambda d: (d / "meta" / "metadata").write_text("{not json"), True),
    "state item removed": (lambda d: shutil.rmtree(d / "state"), True),
    "meta item removed": (lambda d: shutil.rmtree(d / "meta"), True),
    "sharding file removed": (lambda d: (d / "state" / "_sharding").unlink(), False),
}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory) -> Path:
    """OUT with checkpoints 1, 2, 3 written asynchronously and sealed."""
    out = tmp_path_factory.mktemp("ckpt") / "run"
    checkpoints = Checkpoints(out, keep=5, async_save=True)
    for step in (1, 2, 3):
        checkpoints.save(step, state_at(step), {"step": step})
    checkpoints.wait()
    checkpoints.close()
    return out


def resume(out: Path) -> tuple[int, dict, dict]:
    checkpoints = Checkpoints(out, keep=5, async_save=True)
    try:
        return checkpoints.restore_latest(ABSTRACT)
    finally:
        checkpoints.close()


def assert_state(tree: dict, step: int) -> None:
    for got, want in zip(jax.tree.leaves(tree), jax.tree.leaves(state_at(step))):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_every_step_is_sealed_and_verifies_after_reopening(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    step, tree, meta = resume(out)  # restoring must not rewrite what the seal covers
    assert (step, meta) == (3, {"step": 3})
    assert_state(tree, 3)
    for step in (1, 2, 3):
        assert mckpt.verify(out / "checkpoints" / str(step)) is True


@pytest.mark.parametrize("sealed", [True, False], ids=["sealed", "unsealed"])
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_newest_is_set_aside_and_the_previous_restored(saved_run, tmp_path, capsys, damage,
                                                             sealed):
    apply, detectable_unsealed = DAMAGE[damage]
    if not sealed and not detectable_unsealed:
        pytest.skip("only the manifest can tell (orbax restores it: silently wrong or unneeded)")
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    newest = out / "checkpoints" / "3"
    if not sealed:
        (newest / mckpt.MANIFEST).unlink()
    apply(newest)
    before = sorted(p.name for p in (out / "checkpoints").iterdir())

    step, tree, meta = resume(out)
    assert (step, meta) == (2, {"step": 2})
    assert_state(tree, 2)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("warning: checkpoint step 3 is damaged"), err
    assert "Traceback" not in err[0] and "3.damaged" in err[0]
    after = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert after == sorted(["3.damaged" if n == "3" else n for n in before])  # renamed, not deleted


def test_sealed_damage_names_the_file(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    target = array_file(out / "checkpoints" / "3")
    os.truncate(target, 5)
    with pytest.raises(mckpt.DamagedCheckpointError, match=f"{target.name} has 5 bytes"):
        mckpt.verify(out / "checkpoints" / "3")


def test_all_damaged_is_one_error_and_nothing_is_deleted(saved_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    for step in (1, 2, 3):
        os.truncate(out / "checkpoints" / str(step) / "state" / "_METADATA", 0)
    with pytest.raises(TrainError, match="no intact checkpoint"):
        resume(out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["1.damaged", "2.damaged",
                                                                      "3.damaged"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 3  # one line per checkpoint


def test_second_damage_of_the_same_step_keeps_the_first(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    (out / "checkpoints" / "3.damaged").mkdir()
    shutil.rmtree(out / "checkpoints" / "3" / "meta")
    assert resume(out)[0] == 2
    assert (out / "checkpoints" / "3.damaged.1").is_dir() and (out / "checkpoints" / "3.damaged").is_dir()


def test_other_shapes_are_a_mismatch_not_damage(saved_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(saved_run, out)
    other = {**ABSTRACT, "w": jax.ShapeDtypeStruct((64, 32), jnp.float32)}
    checkpoints = Checkpoints(out, keep=5, async_save=True)
    with pytest.raises(TrainError, match=r"does not match the model.*\(64, 64\)"):
        checkpoints.restore_latest(other)
    assert (out / "checkpoints" / "3").is_dir()  # not set aside


MICRO = moejax.ModelConfig(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=32,
                           moe=moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "m"
    # numpy values in an abstract model: no per-initializer compiles
    graphdef, state = nnx.split(nnx.eval_shape(lambda: moejax.Transformer(MICRO, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    nnx.replace_by_pure_dict(state, jax.tree.map(
        lambda x: jnp.asarray(rng.normal(size=x.shape).astype(x.dtype)), nnx.to_pure_dict(state)))
    mckpt.save_model(path, nnx.merge(graphdef, state), MICRO)
    return path


MODEL_DAMAGE = {
    "array file truncated": lambda d: os.truncate(largest_file(d / "model"), 9),
    "metadata garbage": lambda d: (d / "model" / "_METADATA").write_text("]]"),
    "metadata removed": lambda d: (d / "model" / "_METADATA").unlink(),
    "model dir removed": lambda d: shutil.rmtree(d / "model"),
    "model dir is a file": lambda d: shutil.rmtree(d / "model") or (d / "model").write_text("x"),
}


@pytest.mark.parametrize("damage", sorted(MODEL_DAMAGE))
def test_damaged_model_dir_is_one_clear_error(model_dir, tmp_path, damage):
    path = tmp_path / "m"
    shutil.copytree(model_dir, path)
    MODEL_DAMAGE[damage](path)
    with pytest.raises(mckpt.DamagedCheckpointError) as err:
        mckpt.load_model(path)
    message = str(err.value)
    assert "\n" not in message and str(path / "model") in message, message


def test_model_dir_round_trip_verifies(model_dir):
    assert mckpt.verify(model_dir / "model") is True
    model, cfg = mckpt.load_model(model_dir)
    assert cfg == MICRO
    assert json.loads((model_dir / "model" / mckpt.MANIFEST).read_text())["files"]


def test_load_model_dtype_reaches_the_moe_layers(model_dir):
    # the compute dtype of every block, the MoE layers' own config included (it used to
    # set ModelConfig.dtype only: the MoE layers kept computing in float32)
    model, cfg = mckpt.load_model(model_dir, dtype="bfloat16")
    assert cfg.dtype == "bfloat16" and cfg.moe.dtype == "bfloat16"
    moe_dtypes = {block.ffn.cfg.dtype for block in model.layers if isinstance(block.ffn, moejax.MoE)}
    assert moe_dtypes == {"bfloat16"}
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def test_model_saved_on_a_mesh_loads_with_another_device_count(model_dir, tmp_path):
    """A model directory written from sharded arrays (``python -m train --mesh ...``) loads
    wherever the device count differs (export on one device): orbax restored the saving
    mesh's layout and failed with a 'topology mismatch', reported as damage."""
    from moejax import sharding
    reference, cfg = mckpt.load_model(model_dir)
    mesh = sharding.make_mesh("expert=2,tensor=2", devices=jax.devices()[4:])
    sharding.shard_model(reference, mesh)
    mckpt.save_model(tmp_path / "m", reference, cfg)
    model, _ = mckpt.load_model(tmp_path / "m")
    for got, want in zip(jax.tree.leaves(nnx.state(model)), jax.tree.leaves(nnx.state(reference))):
        assert got.sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
