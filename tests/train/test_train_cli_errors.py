"""Bad input to ``python -m train``: one ``error:`` line, exit 2, no traceback, nothing
on disk changed.

Table-driven: each case builds its files in its own directory (names with
spaces), runs the command line as a subprocess, and the tree is hashed before
and after (names, kinds and bytes). Flags, paths and data are checked before
jax is imported, so most cases take well under a second; all cases start
together in a small pool, so the file costs about its slowest few cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from train_cli_helper import MICRO, run_train, save_micro_model

SHAPE = MICRO[MICRO.index("--batch-size"):]  # batch / seq / eval flags of the micro runs
TEXT = "def f(x):\n    return x * 2\n" * 300


def text(d: Path) -> str:
    (d / "data dir").mkdir(exist_ok=True)
    path = d / "data dir" / "corpus one.txt"
    path.write_text(TEXT)
    return str(path)


def array(d: Path, values, name="tokens.npy") -> str:
    np.save(d / name, np.asarray(values))
    return str(d / name)


def fifo(d: Path, name="a fifo") -> str:
    os.mkfifo(d / name)
    return str(d / name)


def fake_run(d: Path, step: int | None = None, model: bool = False, preset: str = "tiny") -> str:
    """A run directory as far as the start rules look: config.json (+ model/ or checkpoints/<step>)."""
    from moejax.config import ModelConfig, config_to_dict
    out = d / "the run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(config_to_dict(ModelConfig.preset(preset))))
    if model:
        (out / "model").mkdir()
    if step is not None:
        (out / "checkpoints" / str(step) / "state").mkdir(parents=True)
        (out / "checkpoints" / str(step) / "state" / "_METADATA").write_text("{}")
    return str(out)


def damaged_model(d: Path) -> str:
    out = save_micro_model(d / "the run", seed=0)
    arrays = [p for p in (out / "model").rglob("*") if p.is_file() and "ocdbt" in str(p)]
    os.truncate(max(arrays, key=lambda p: p.stat().st_size), 7)
    return str(out)


def foreign_dir(d: Path) -> str:
    out = d / "hf model"
    out.mkdir()
    (out / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 32}))
    (out / "model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}")
    return str(out)


def file_at(d: Path, name: str, content: str | bytes = "x") -> str:
    path = d / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


# name -> (setup(d) -> argv, [needles in the error line]); --out defaults to d/"new run"
CASES = {
    # --data
    "data missing": (lambda d: ["--data", str(d / "no such corpus.txt")], ["no such file"]),
    "data is a fifo": (lambda d: ["--data", fifo(d)], ["not a regular file"]),
    "data unreadable (/proc/self/mem)": (lambda d: ["--data", "/proc/self/mem"], ["cannot read",
                                                                                  "/proc/self/mem"]),
    "data path through a file": (lambda d: ["--data", text(d) + "/inner.txt"], ["no such file"]),
    "data empty file": (lambda d: ["--data", file_at(d, "empty file.txt", "")], ["empty"]),
    "data dir with no files": (lambda d: (d / "empty dir").mkdir() or ["--data", str(d / "empty dir")],
                               ["holds no files"]),
    "data dir with only a fifo and hidden files": (
        lambda d: (d / "odd").mkdir() or fifo(d / "odd") and file_at(d / "odd", ".hidden")
        and ["--data", str(d / "odd")], ["holds no files"]),
    "data glob matches nothing": (lambda d: ["--data", str(d / "*.nothing")], ["matches no files"]),
    "data too short": (lambda d: ["--data", file_at(d, "short.txt", "abc")], ["fewer than --seq-len"]),
    "data npy garbage": (lambda d: ["--data", file_at(d, "bad.npy", b"\x93NUMPY garbage")],
                         ["cannot read token array"]),
    "data npy 2-D": (lambda d: ["--data", array(d, np.zeros((4, 4), np.int32))], ["1-D integer"]),
    "data npy floats": (lambda d: ["--data", array(d, np.ones(500))], ["1-D integer"]),
    "data npy negative ids": (lambda d: ["--data", array(d, np.arange(-1, 600))], [">= 0"]),
    "data ids beyond int32": (lambda d: ["--data", array(d, np.arange(600, dtype=np.int64) << 31)],
                              ["does not fit int32"]),
    "data bin odd byte count": (lambda d: ["--data", file_at(d, "t.bin", b"\x01\x02\x03")],
                                ["cannot read token array"]),
    "data ids beyond an explicit preset": (
        lambda d: ["--data", array(d, np.arange(5000) % 1000), "--preset", "tiny"],
        ["token ids up to 999", "preset 'tiny'", "--set vocab_size=1000"]),
    "data ids beyond an explicit --set vocab_size": (
        lambda d: ["--data", array(d, np.arange(5000) % 300), "--set", "vocab_size=256"],
        ["token ids up to 299", "--set vocab_size=300"]),
    "data ids beyond an existing run": (
        lambda d: ["--data", array(d, np.arange(5000) % 1000), "--out", fake_run(d, model=True)],
        ["token ids up to 999", "vocab_size 256", "another --out"]),
    # --tokenizer
    "tokenizer garbage": (lambda d: ["--data", text(d), "--tokenizer", file_at(d, "tok.json", "{oops")],
                          ["not a tokenizer.json"]),
    "tokenizer is a directory": (lambda d: ["--data", text(d), "--tokenizer", str(d)], ["is not a file"]),
    "tokenizer missing": (lambda d: ["--data", text(d), "--tokenizer", str(d / "t.json")], ["no such file"]),
    "tokenizer with token array": (lambda d: ["--data", array(d, np.arange(500)), "--tokenizer",
                                              file_at(d, "t.json", "{}")], ["already tokenized"]),
    # --out
    "out is a file": (lambda d: ["--data", text(d), "--out", file_at(d, "a file")],
                      ["exists and is not a directory"]),
    "out under a file": (lambda d: ["--data", text(d), "--out", file_at(d, "a file") + "/run"],
                         ["is not a directory"]),
    "out is a fifo": (lambda d: ["--data", text(d), "--out", fifo(d)], ["not a directory"]),
    "out not writable (/proc)": (lambda d: ["--data", text(d), "--out", "/proc/moejax run"],
                                 ["cannot write in '/proc'"]),
    "out empty string": (lambda d: ["--data", text(d), "--out", ""], ["--out"]),
    "out holds someone else's files": (lambda d: ["--data", text(d), "--out", foreign_dir(d)],
                                       ["not empty", "--force"]),
    "out holds a garbage config.json": (
        lambda d: (d / "r").mkdir() or file_at(d / "r", "config.json", "{garbage") and
        ["--data", text(d), "--out", str(d / "r")], ["not a moejax model config", "--force"]),
    "out holds a directory named config.json": (
        lambda d: (d / "r" / "config.json").mkdir(parents=True) or
        ["--data", text(d), "--out", str(d / "r")], ["config.json is not a file"]),
    "out holds a file named checkpoints": (
        lambda d: (d / "r").mkdir() or file_at(d / "r", "checkpoints") and
        ["--data", text(d), "--out", str(d / "r")], ["checkpoints is not a directory"]),
    "out holds a model of another preset": (
        lambda d: ["--data", text(d), "--out", fake_run(d, model=True), "--preset", "dense-tiny"],
        ["different model shape", "drop --preset/--set"]),
    "out holds a killed run of another shape": (
        lambda d: ["--data", text(d), "--out", fake_run(d), "--set", "n_layers=1"],
        ["different model shape", "n_layers"]),
    "out holds a damaged model": (lambda d: ["--data", text(d), "--out", damaged_model(d), *SHAPE],
                                  ["is damaged", "has 7 bytes"]),
    "out holds a run of another layer layout": (
        lambda d: ["--data", text(d), "--out", fake_run(d, model=True), "--set", "scan_layers=true"],
        ["--set scan_layers=true", "scan_layers=false, which it keeps", "another --out"]),
    "steps below the run's step": (lambda d: ["--data", text(d), "--out", fake_run(d, step=40),
                                              "--steps", "10"], ["--steps 10 is below step 40"]),
    "resume with nothing to resume": (lambda d: ["--data", text(d), "--resume"], ["--resume", "neither"]),
    "resume in an empty directory": (
        lambda d: (d / "e").mkdir() or ["--data", text(d), "--resume", "--out", str(d / "e")], ["--resume"]),
    # flags
    "unknown preset": (lambda d: ["--preset", "gpt-17"], ["unknown preset 'gpt-17'", "tiny"]),
    "bad mesh string": (lambda d: ["--data", text(d), "--mesh", "data=two"], ["--mesh", "data=two"]),
    "mesh vs device count": (lambda d: ["--data", text(d), "--mesh", "data=2,expert=4"],
                             ["needs 8 devices", "1 are available"]),
    "steps not a number": (lambda d: ["--steps", "abc"], ["--steps", "invalid int"]),
    "steps zero": (lambda d: ["--steps", "0"], ["--steps must be a positive integer"]),
    "steps negative": (lambda d: ["--steps", "-5"], ["--steps must be a positive integer"]),
    "batch size zero": (lambda d: ["--batch-size", "0"], ["--batch-size must be a positive"]),
    "seq len negative": (lambda d: ["--seq-len", "-1"], ["--seq-len must be a positive"]),
    "keep zero": (lambda d: ["--keep", "0"], ["--keep must be a positive"]),
    "lr negative": (lambda d: ["--lr", "-1"], ["--lr must be > 0"]),
    "lr nan": (lambda d: ["--lr", "nan"], ["--lr must be a finite number"]),
    "clip norm inf": (lambda d: ["--clip-norm", "inf"], ["--clip-norm must be a finite number"]),
    "beta2 above one": (lambda d: ["--beta2", "1.5"], ["--beta2 must be in [0, 1]"]),
    "warmup negative": (lambda d: ["--warmup-steps", "-3"], ["--warmup-steps must be >= 0"]),
    "seed beyond 32 bits": (lambda d: ["--seed", str(2**64)], ["--seed must be in [0, 4294967295]"]),
    "dtype unknown": (lambda d: ["--dtype", "int8"], ["--dtype", "invalid choice"]),
    "unknown flag": (lambda d: ["--stpes", "3"], ["unrecognized arguments"]),
    "set unknown field": (lambda d: ["--set", "n_layerz=2"], ["unknown model field", "n_layerz"]),
    "set without =": (lambda d: ["--set", "n_layers"], ["expected FIELD=VALUE"]),
    "set invalid value": (lambda d: ["--set", "moe.top_k=9"], ["top_k=9 exceeds num_experts=8"]),
    "set zero layers": (lambda d: ["--set", "n_layers=0"], ["n_layers"]),
    "seq len beyond the model": (lambda d: ["--data", text(d), "--seq-len", "100000"],
                                 ["exceeds the model's max_seq_len"]),
    "param group that matches nothing": (
        lambda d: ["--data", text(d), *MICRO, "--param-group", "nothing_like_this=2"],
        ["matches no parameter"]),
}


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> kind and content hash, for everything under ``root``."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            out[rel] = f"link:{os.readlink(path)}"
        elif path.is_fifo():
            out[rel] = "fifo"
        elif path.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run_case(name: str, root: Path):
    d = root / name.replace("/", "_")
    d.mkdir(parents=True)
    args = CASES[name][0](d)
    if "--out" not in args:
        args = [*args, "--out", str(d / "new run")]
    before = tree_digest(d)
    t0 = time.perf_counter()
    result = run_train(args, timeout=240)
    print(f"{time.perf_counter() - t0:6.1f}s {name}")
    return result, before, tree_digest(d)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Every case's subprocess, started together in a small pool."""
    root = tmp_path_factory.mktemp("train cli errors")
    with ThreadPoolExecutor(max_workers=3) as pool:
        futures = {name: pool.submit(_run_case, name, root) for name in CASES}
        return {name: future.result() for name, future in futures.items()}


def assert_one_line_error(returncode: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert returncode == 2, (returncode, stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(results, case):
    result, before, after = results[case]
    assert_one_line_error(result.returncode, result.stderr, *CASES[case][1])
    assert after == before  # nothing created, changed or removed


def test_help_documents_the_exit_statuses():
    result = run_train(["--help"], timeout=60)
    assert result.returncode == 0
    assert "Exit status" in result.stdout and "2 bad input" in result.stdout.replace("\n", " ")
    assert "--force" in result.stdout


def test_force_writes_into_a_foreign_directory_only_when_asked(tmp_path):
    """--force gets past the foreign-directory check (the run then fails on a later check,
    which must still leave the foreign files alone)."""
    out = foreign_dir(tmp_path)
    before = tree_digest(Path(out))
    result = run_train(["--data", file_at(tmp_path, "short.txt", "abc"), "--out", out, "--force"],
                       timeout=60)
    assert_one_line_error(result.returncode, result.stderr, "fewer than --seq-len")
    assert tree_digest(Path(out)) == before


def test_checkpoint_of_other_shape(tmp_path):
    """config.json says one expert width, the stored arrays have another."""
    out = save_micro_model(tmp_path / "run", seed=0)
    config = json.loads((out / "config.json").read_text())
    config["moe"]["d_ff"] = 48
    (out / "config.json").write_text(json.dumps(config))
    before = tree_digest(out)
    result = run_train(["--out", str(out), "--resume", "--data", text(tmp_path), *SHAPE], timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "does not match", "(4, 32, 32)", "(4, 48, 32)")
    assert tree_digest(out) == before
    shutil.rmtree(out)


def test_set_of_a_compute_field_applies_to_an_existing_run(tmp_path):
    """dtype / moe.dtype / remat may change between runs: a --set of one reaches the saved
    model (it used to be dropped silently), and dtype carries the MoE block along."""
    from train.config import TrainConfig
    from train.start import plan_start
    out = fake_run(tmp_path, model=True)
    start = plan_start(TrainConfig(out=out, model_overrides=("dtype=bfloat16", "remat=full")), 256)
    cfg = start.model_cfg
    assert (start.kind, cfg.dtype, cfg.moe.dtype, cfg.remat) == ("model", "bfloat16", "bfloat16", "full")
    cfg = plan_start(TrainConfig(out=out, model_overrides=("moe.dtype=bfloat16",)), 256).model_cfg
    assert (cfg.dtype, cfg.moe.dtype, cfg.remat, cfg.scan_layers) == ("float32", "bfloat16", "none", False)


def word_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json over TEXT's words (ids 0..8: far from the bytes)."""
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "def", "f", "(", "x", "):", "return", "*", "2"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def test_text_for_a_run_with_a_tokenizer_is_read_with_it(tmp_path):
    """A converted model keeps its tokenizer in RUN/tokenizer/: text for it must be its token
    ids, not bytes (which it silently was), and train_config.json records the file by
    absolute path for `serve export`; a recorded tokenizer that is gone is an error."""
    from train.config import TrainConfig
    from train.start import preflight
    out = Path(fake_run(tmp_path, model=True))
    tokenizer = word_tokenizer(out / "tokenizer" / "tokenizer.json")
    cfg = TrainConfig(out=str(out), data=text(tmp_path), batch_size=2, seq_len=8)
    corpus, start = preflight(cfg)
    assert start.kind == "model" and corpus.tokenizer == str(tokenizer.absolute())
    assert set(np.unique(corpus.train)) == set(range(1, 9))  # word ids, not bytes
    assert len(corpus.train) + len(corpus.val) == 9 * 300
    (out / "train_config.json").write_text(json.dumps({"tokenizer": str(tmp_path / "gone.json")}))
    with pytest.raises(Exception, match="gone.json.*which is gone; pass --tokenizer"):
        preflight(cfg)


def test_ctrl_c_before_the_loop_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    """A SIGINT during set-up (imports, restore, first evaluation: before the loop's handler)
    used to end in a KeyboardInterrupt traceback; like the loop's stop it exits 130."""
    import train.start
    from train.cli import main

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(train.start, "preflight", interrupted)
    status = main(["--out", str(tmp_path / "run")])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert status == 130 and len(lines) == 1, lines
    assert lines[0].startswith("error: interrupted by SIGINT") and str(tmp_path / "run") in lines[0]
