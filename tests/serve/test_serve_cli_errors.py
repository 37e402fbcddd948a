"""Bad input to ``python -m serve`` gets one ``error:`` line and exit 2, never a traceback,
and leaves existing files as they were. Table-driven; most cases run in-process (same code
path as the command, no interpreter start-up), two through a real subprocess."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import cli
from tests.xla_flags import xla_flags

REPO = Path(__file__).resolve().parents[2]


def assert_one_line_error(returncode: int, stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert returncode == 2, (returncode, stderr)
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def files(tmp_path, micro_run, micro_serving):
    """Paths the cases refer to: {run}, {serving}, {missing}, {existing}, {notjson}."""
    (tmp_path / "existing").mkdir()
    (tmp_path / "existing" / "keep.txt").write_text("keep me")
    (tmp_path / "notserving").mkdir()
    bad_template = tmp_path / "chat.jinja"
    bad_template.write_text("{% for m in messages %}{{ m.content }")
    return {"run": str(micro_run), "serving": str(micro_serving), "missing": str(tmp_path / "missing"),
            "existing": str(tmp_path / "existing"), "notserving": str(tmp_path / "notserving"),
            "out": str(tmp_path / "new_out"), "bad_template": str(bad_template)}


CASES = {
    "no command": ([], ["command"]),
    "unknown command": (["serve-me"], ["invalid choice"]),
    "export: missing --ckpt dir": (["export", "--ckpt", "{missing}", "--out", "{out}"], ["no config.json"]),
    "export: existing --out": (["export", "--ckpt", "{run}", "--out", "{existing}"],
                               ["already exists", "--force"]),
    "export: bad dtype": (["export", "--ckpt", "{run}", "--out", "{out}", "--dtype", "float8"],
                          ["--dtype", "invalid choice"]),
    "export: serving dir as source": (["export", "--ckpt", "{serving}", "--out", "{out}"], ["model"]),
    "generate: not a serving dir": (["generate", "--model", "{notserving}", "--prompt", "x"],
                                    ["no manifest.json"]),
    "generate: missing model": (["generate", "--model", "{missing}", "--prompt", "x"], ["no manifest.json"]),
    "generate: negative temperature": (["generate", "--model", "{serving}", "--prompt", "x",
                                        "--temperature", "-1"], ["temperature", "[0, 100]"]),
    "generate: top-p zero": (["generate", "--model", "{serving}", "--prompt", "x", "--top-p", "0"], ["top_p"]),
    "generate: max-new-tokens not int": (["generate", "--model", "{serving}", "--prompt", "x",
                                          "--max-new-tokens", "many"], ["--max-new-tokens", "invalid int"]),
    "generate: zero slots": (["generate", "--model", "{serving}", "--prompt", "x", "--slots", "0"],
                             ["--slots must be >= 1"]),
    "generate: over the context": (["generate", "--model", "{serving}", "--prompt", "x" * 60,
                                    "--max-new-tokens", "10"], ["context limit of 64"]),
    "generate: max-len past the model's": (["generate", "--model", "{serving}", "--prompt", "x",
                                            "--max-len", "65"], ["max_len", "[1, 64]"]),
    "generate: empty prompt": (["generate", "--model", "{serving}", "--prompt", ""], ["empty"]),
    "generate: offload flag without --offload": (["generate", "--model", "{serving}", "--prompt", "x",
                                                  "--policy", "lru"], ["--policy", "add --offload"]),
    "generate: unknown offload policy": (["generate", "--model", "{serving}", "--prompt", "x", "--offload",
                                          "--policy", "belady"], ["--policy", "invalid choice"]),
    "http: bad port": (["http", "--model", "{serving}", "--port", "70000"], ["--port"]),
    "http: missing model": (["http", "--model", "{missing}", "--port", "0"], ["no manifest.json"]),
    "http: missing chat template": (["http", "--model", "{serving}", "--port", "0", "--chat-template",
                                     "{missing}"], ["--chat-template", "no such file"]),
    "http: chat template not Jinja": (["http", "--model", "{serving}", "--port", "0", "--chat-template",
                                       "{bad_template}"], ["chat template", "not valid Jinja"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_in_process(case, files, tmp_path, capsys):
    args, needles = CASES[case]
    before = {name: tree_digest(Path(files[name])) for name in ("run", "serving", "existing")}
    code = cli.main([a.format(**files) for a in args])
    assert_one_line_error(code, capsys.readouterr().err, *needles)
    assert {name: tree_digest(Path(files[name])) for name in before} == before
    assert not Path(files["out"]).exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]   # no half-written export left


@pytest.mark.parametrize("case", ["export: existing --out", "generate: negative temperature"])
def test_bad_input_subprocess(case, files):
    args, needles = CASES[case]
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags())
    result = subprocess.run([sys.executable, "-m", "serve", *[a.format(**files) for a in args]], cwd=REPO,
                            text=True, capture_output=True, timeout=120, env=env)
    assert_one_line_error(result.returncode, result.stderr, *needles)
    assert (Path(files["existing"]) / "keep.txt").read_text() == "keep me"


def test_export_force_replaces(files, capsys):
    assert cli.main(["export", "--ckpt", files["run"], "--out", files["existing"], "--force"]) == 0
    assert (Path(files["existing"]) / "manifest.json").is_file()
    assert not (Path(files["existing"]) / "keep.txt").exists()


def test_generate_prints_text_and_stats(micro_serving, capsys, monkeypatch):
    # what the engine returned is recorded (its tokens are checked against the full forward in
    # test_engine.py); here: the command prints exactly that text, and the figures on stderr
    from serve import Engine
    returned = []
    generate = Engine.generate
    monkeypatch.setattr(Engine, "generate", lambda self, *a, **k: returned.extend(generate(self, *a, **k))
                        or returned)
    code = cli.main(["generate", "--model", str(micro_serving), "--prompt", "ab", "--max-new-tokens", "3",
                     "--slots", "1", "--chunk", "4", "--stats"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert len(returned) == 1 and len(returned[0].tokens) == 3
    assert captured.out == returned[0].text + "\n"
    assert "decode" in captured.err and "time to first token" in captured.err


def _cut(name, keep):
    def damage(d: Path):
        data = (d / name).read_bytes()
        (d / name).write_bytes(data[:keep(len(data))])
    return damage


def _edit_manifest(change):
    def damage(d: Path):
        import json
        manifest = json.loads((d / "manifest.json").read_text())
        change(manifest)
        (d / "manifest.json").write_text(json.dumps(manifest))
    return damage


DAMAGED = {   # a serving checkpoint damaged after export: a one-line error naming the file
    "experts file cut short": (_cut("experts.safetensors", lambda n: n - 100), ["experts.safetensors", "truncated"]),
    "model file empty": (_cut("model.safetensors", lambda n: 0), ["model.safetensors", "truncated"]),
    "header cut mid-JSON": (_cut("model.safetensors", lambda n: 60), ["model.safetensors"]),
    "config not JSON": (lambda d: (d / "config.json").write_text("{"), ["config.json"]),
    "manifest without files": (_edit_manifest(lambda m: m.pop("files")), ["manifest.json", "files"]),
    "manifest lists a tensor the file lacks": (
        _edit_manifest(lambda m: m["experts"]["layers.0.ffn.experts"]["tensors"].append("w_extra")),
        ["experts.safetensors", "w_extra"]),
}


@pytest.mark.parametrize("case", sorted(DAMAGED))
def test_damaged_serving_checkpoint(case, micro_serving, tmp_path, capsys):
    import shutil
    damage, needles = DAMAGED[case]
    model = tmp_path / "serving"
    shutil.copytree(micro_serving, model)
    damage(model)
    code = cli.main(["generate", "--model", str(model), "--prompt", "x", "--slots", "1", "--chunk", "4"])
    assert_one_line_error(code, capsys.readouterr().err, *needles)


def test_damaged_config_with_offload(micro_serving, tmp_path, capsys):
    """The offloaded engine reads the same config through the same checks."""
    import shutil
    model = tmp_path / "serving"
    shutil.copytree(micro_serving, model)
    (model / "config.json").write_text("[1]")
    code = cli.main(["generate", "--model", str(model), "--prompt", "x", "--offload", "--slots-per-layer", "1"])
    assert_one_line_error(code, capsys.readouterr().err, "config.json")
