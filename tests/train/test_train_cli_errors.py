"""Bad input gets one clear ``error:`` line and a non-zero exit, never a traceback.

The cases named by the issue run ``python -m train`` in a subprocess; argument
and config errors that are raised before any JAX work are also checked
in-process (same code path, no interpreter start-up).
"""

from __future__ import annotations

import json
import shutil

import pytest
from train import cli
from train_cli_helper import MICRO, run_train, save_micro_model


def assert_one_line_error(returncode: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode != 0
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.fixture(scope="module")
def micro_model_dir(tmp_path_factory):
    return save_micro_model(tmp_path_factory.mktemp("micro_model"), seed=0)


def _with_changed_config(src, dst, **moe_changes):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config["moe"].update(moe_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


CASES = {
    "missing data path": (["--data", "/no/such/corpus.txt"], ["no such file"]),
    "unknown preset": (["--preset", "gpt-17"], ["unknown preset 'gpt-17'", "tiny"]),
    "bad mesh string": (["--mesh", "data=two"], ["--mesh", "data=two"]),
    "mesh vs device count": (["--mesh", "data=2,expert=4"], ["needs 8 devices", "1 are available"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_subprocess(case, tmp_path):
    args, needles = CASES[case]
    result = run_train([*args, "--out", str(tmp_path / "run")], timeout=120)
    assert_one_line_error(result.returncode, result.stderr, *needles)
    assert not (tmp_path / "run").exists()  # nothing half-made is left behind


def test_empty_data_file_subprocess(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_train(["--data", str(empty), "--out", str(tmp_path / "run")], timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "empty")


def test_checkpoint_of_other_shape_subprocess(micro_model_dir, tmp_path):
    # config.json says one expert width, the stored arrays have another
    out = _with_changed_config(micro_model_dir, tmp_path / "run", d_ff=48)
    result = run_train(["--out", str(out), "--resume", *MICRO[MICRO.index("--batch-size"):]],
                       timeout=120)
    assert_one_line_error(result.returncode, result.stderr, "does not match", "(4, 32, 32)",
                          "(4, 48, 32)")


def test_other_preset_than_the_saved_model(micro_model_dir, corpus_file, tmp_path, capsys):
    shutil.copytree(micro_model_dir, tmp_path / "run")
    code = cli.main(["--out", str(tmp_path / "run"), "--preset", "dense-tiny",
                     "--data", str(corpus_file), "--seq-len", "32", "--batch-size", "8"])
    assert_one_line_error(code, capsys.readouterr().err, "different model shape", "d_model")


@pytest.mark.parametrize("args,needles", [
    (["--steps", "abc"], ["--steps", "invalid int"]),
    (["--steps", "0"], ["--steps must be a positive integer"]),
    (["--set", "n_layerz=2"], ["unknown model field", "n_layerz"]),
    (["--set", "moe.top_k=9"], ["top_k=9 exceeds num_experts=8"]),
    (["--mesh", "tensor=1,foo=2"], ["unknown mesh axis 'foo'"]),
    (["--dtype", "int8"], ["--dtype", "invalid choice"]),
    (["--lr", "-1"], ["--lr must be > 0"]),
])
def test_bad_arguments_in_process(args, needles, tmp_path, capsys):
    code = cli.main([*args, "--out", str(tmp_path / "run")])
    assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_resume_with_nothing_to_resume(tmp_path, capsys):
    (tmp_path / "data.txt").write_text("x = 1\n" * 200)
    code = cli.main(["--resume", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "data.txt")])
    assert_one_line_error(code, capsys.readouterr().err, "--resume", "neither a checkpoint")
