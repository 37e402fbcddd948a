"""Bad input to ``python -m moejax.convert``: one ``error:`` line, exit 2, no traceback,
nothing on disk changed.

Table-driven like tests/train/test_train_cli_errors.py: each case copies a
valid Hugging Face checkpoint (or moejax model directory) into its own
directory (names with spaces), damages it, runs the command line as a
subprocess and compares a hash of the tree before and after. The input is
checked before jax is imported, so only the cases that must read tensors
(wrong dtype or shape, a damaged model/) pay for it; all cases start together
in a small pool.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from moejax import checkpoint
from moejax.convert import save_hf
from test_convert_io import family_configs, random_model, rewrite_config
from tests.xla_flags import xla_flags

REPO = Path(__file__).resolve().parents[2]


def run_convert(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS=xla_flags())
    env.update(PYTHONPATH=f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "moejax.convert", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    """A valid Mixtral HF checkpoint and the moejax model directory of the same model."""
    root = tmp_path_factory.mktemp("convert sources")
    cfg = family_configs()["mixtral"]
    model = random_model(cfg)
    save_hf(model, cfg, root / "hf")
    checkpoint.save_model(root / "run", model, cfg)
    return {"hf": root / "hf", "run": root / "run"}


def hf(d: Path, src: dict, **config_changes) -> Path:
    """A copy of the HF checkpoint; ``config_changes`` edit its config.json (None deletes)."""
    path = d / "hf model"
    shutil.copytree(src["hf"], path)
    if config_changes:
        rewrite_config(path / "config.json", path / "config.json", config_changes)
    return path


def with_file(path: Path, name: str, content: bytes | str) -> Path:
    (path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def truncated(path: Path, name: str, keep: int | None = None) -> Path:
    size = (path / name).stat().st_size
    os.truncate(path / name, size // 2 if keep is None else keep)
    return path


def with_tensors(path: Path, change) -> Path:
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(path / "model.safetensors"))
    return path


def run_copy(d: Path, src: dict) -> Path:
    shutil.copytree(src["run"], d / "the run")
    return d / "the run"


def damaged_run(d: Path, src: dict) -> Path:
    run = run_copy(d, src)
    arrays = [p for p in (run / "model").rglob("*") if p.is_file() and "ocdbt" in str(p)]
    os.truncate(max(arrays, key=lambda p: p.stat().st_size), 11)
    return run


def training_run(d: Path, src: dict) -> Path:
    run = run_copy(d, src)
    (run / "checkpoints" / "100").mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 100, "loss": 1.0}\n')
    return run


def a_file(d: Path, name: str = "a file") -> Path:
    (d / name).write_text("not a directory")
    return d / name


GATE = "model.layers.0.block_sparse_moe.gate.weight"
FROM = "--from-hf"

# name -> (setup(d, sources) -> argv, [needles]); --out defaults to d/"new out"
CASES = {
    "hf dir missing": (lambda d, s: [FROM, str(d / "no such model")], ["no such directory"]),
    "hf dir is a file": (lambda d, s: [FROM, str(a_file(d))], ["is not a directory"]),
    "no config.json": (lambda d, s: [FROM, str((hf(d, s) / "config.json").unlink() or d / "hf model")],
                       ["no config.json"]),
    "config.json garbage": (lambda d, s: [FROM, str(with_file(hf(d, s), "config.json", "{oops"))],
                            ["config.json is not valid JSON"]),
    "config.json binary": (lambda d, s: [FROM, str(with_file(hf(d, s), "config.json", b"\xff\xfe\x00"))],
                           ["config.json is not valid JSON"]),
    "config.json empty": (lambda d, s: [FROM, str(with_file(hf(d, s), "config.json", ""))],
                          ["config.json is not valid JSON"]),
    "config.json a list": (lambda d, s: [FROM, str(with_file(hf(d, s), "config.json", "[1, 2]"))],
                           ["not an object"]),
    "unsupported model_type": (lambda d, s: [FROM, str(hf(d, s, model_type="llama"))],
                               ["model_type='llama'", "mixtral"]),
    "unknown config option": (lambda d, s: [FROM, str(hf(d, s, some_new_switch=True))],
                              ["some_new_switch"]),
    "config value of the wrong type": (lambda d, s: [FROM, str(hf(d, s, num_local_experts="four"))],
                                       ["config.json"]),
    "missing required key": (lambda d, s: [FROM, str(hf(d, s, hidden_size=None))], ["hidden_size"]),
    "no safetensors": (lambda d, s: [FROM, str((hf(d, s) / "model.safetensors").unlink() or
                                               d / "hf model")], ["no model.safetensors"]),
    "safetensors is a fifo": (lambda d, s: [FROM, str((hf(d, s) / "model.safetensors").unlink() or
                                                      os.mkfifo(d / "hf model" / "model.safetensors")
                                                      or d / "hf model")], ["no model.safetensors"]),
    "safetensors is a directory": (lambda d, s: [FROM, str((hf(d, s) / "model.safetensors").unlink() or
                                                           (d / "hf model" / "model.safetensors").mkdir()
                                                           or d / "hf model")], ["no model.safetensors"]),
    "safetensors truncated": (lambda d, s: [FROM, str(truncated(hf(d, s), "model.safetensors"))],
                              ["model.safetensors is truncated"]),
    "safetensors cut in its header": (
        lambda d, s: [FROM, str(truncated(hf(d, s), "model.safetensors", keep=40))],
        ["model.safetensors is not a safetensors file or is truncated"]),
    "safetensors empty": (lambda d, s: [FROM, str(truncated(hf(d, s), "model.safetensors", keep=0))],
                          ["model.safetensors is not a safetensors file"]),
    "safetensors garbage": (
        lambda d, s: [FROM, str(with_file(hf(d, s), "model.safetensors", os.urandom(5000)))],
        ["model.safetensors"]),
    "safetensors header not json": (
        lambda d, s: [FROM, str(with_file(hf(d, s), "model.safetensors",
                                          (20).to_bytes(8, "little") + b"<html>not json</html>"))],
        ["header is not JSON"]),
    "index garbage": (lambda d, s: [FROM, str(with_file(hf(d, s), "model.safetensors.index.json", "{"))],
                      ["model.safetensors.index.json is not valid JSON"]),
    "index names a missing shard": (
        lambda d, s: [FROM, str(with_file(hf(d, s), "model.safetensors.index.json",
                                          json.dumps({"weight_map": {GATE: "model-2.safetensors"}})))],
        ["model-2.safetensors, which is missing"]),
    "tensor of integer dtype": (
        lambda d, s: [FROM, str(with_tensors(hf(d, s), lambda t: t.update(
            {GATE: t[GATE].astype(np.int32)})))], [GATE, "I32", "floating point"]),
    "tensor of unexpected shape": (
        lambda d, s: [FROM, str(with_tensors(hf(d, s), lambda t: t.update(
            {GATE: np.zeros((5, 32), np.float32)})))], [GATE, "(5, 32)"]),
    # --out for --from-hf
    "out holds a training run": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(training_run(d, s))],
                                 ["already holds a training run", "--force"]),
    "out holds a model": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(run_copy(d, s))],
                          ["already holds a model", "--force"]),
    "out holds other files": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(a_file(d).parent)],
                              ["already holds files", "--force"]),
    "out is the source": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(d / "hf model"), "--force"],
                          ["is the directory being converted"]),
    "out is a file": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(a_file(d))],
                      ["exists and is not a directory"]),
    "out under a file": (lambda d, s: [FROM, str(hf(d, s)), "--out", str(a_file(d) / "run")],
                         ["is not a directory"]),
    "out not writable (/proc)": (lambda d, s: [FROM, str(hf(d, s)), "--out", "/proc/moejax out"],
                                 ["cannot write in '/proc'"]),
    # --to-hf
    "to-hf into a non-empty directory": (
        lambda d, s: ["--to-hf", str(run_copy(d, s)), "--out", str(hf(d, s))],
        ["already holds a model", "--force"]),
    "to-hf of an HF directory": (lambda d, s: ["--to-hf", str(hf(d, s))], ["not a moejax model config"]),
    "to-hf without model/": (lambda d, s: ["--to-hf", str(shutil.rmtree(run_copy(d, s) / "model") or
                                                         d / "the run")], ["no model/ directory"]),
    "to-hf of a damaged model": (lambda d, s: ["--to-hf", str(damaged_run(d, s))],
                                 ["has 11 bytes", "when saved"]),
    "to-hf of a garbage config.json": (
        lambda d, s: ["--to-hf", str(with_file(run_copy(d, s), "config.json", "nope"))],
        ["not a moejax model config"]),
    # flags
    "no --out": (lambda d, s: [FROM, str(d)], ["--out"]),
    "both directions": (lambda d, s: [FROM, str(d), "--to-hf", str(d)], ["not allowed with"]),
    "dtype unknown": (lambda d, s: [FROM, str(d), "--dtype", "float7"], ["--dtype", "invalid choice"]),
    "dtype with --to-hf": (lambda d, s: ["--to-hf", str(d), "--dtype", "bfloat16"], ["--dtype", "--from-hf only"]),
    "expert layout with --from-hf": (lambda d, s: [FROM, str(d), "--expert-layout", "fused"],
                                     ["--expert-layout", "--to-hf only"]),
    "expert layout unknown": (lambda d, s: ["--to-hf", str(d), "--expert-layout", "rows"],
                              ["--expert-layout"]),
}


def tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = ("fifo" if path.is_fifo() else "dir" if path.is_dir() else
                    hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def _run_case(name: str, root: Path, src: dict):
    d = root / name.replace("/", "_")
    d.mkdir(parents=True)
    args = [str(a) for a in CASES[name][0](d, src)]
    if "--out" not in args and name != "no --out":
        args += ["--out", str(d / "new out")]
    before = tree_digest(d)
    result = run_convert(args)
    return result, before, tree_digest(d)


@pytest.fixture(scope="module")
def results(tmp_path_factory, sources):
    root = tmp_path_factory.mktemp("convert cli errors")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_case, name, root, sources) for name in CASES}
        return {name: future.result() for name, future in futures.items()}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(results, case):
    result, before, after = results[case]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    for needle in CASES[case][1]:
        assert needle in lines[0], (needle, lines[0])
    assert after == before  # nothing created, changed or removed


def test_force_converts_into_a_directory_that_holds_a_model(sources, tmp_path):
    out = run_copy(tmp_path, sources)
    (out / "notes.txt").write_text("kept")
    result = run_convert([FROM, str(sources["hf"]), "--out", str(out), "--force"])
    assert result.returncode == 0, result.stderr
    assert (out / "notes.txt").read_text() == "kept"  # only what the conversion writes is replaced
    assert checkpoint.verify(out / "model") is True


def test_help_documents_the_exit_status():
    result = run_convert(["--help"], timeout=60)
    assert result.returncode == 0 and "Exit status" in result.stdout and "--force" in result.stdout
