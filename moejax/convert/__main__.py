"""``python -m moejax.convert``: Hugging Face checkpoints <-> moejax model directories.

    python -m moejax.convert --from-hf HF_DIR --out RUN      # RUN: config.json + orbax model/
    python -m moejax.convert --to-hf RUN --out HF_DIR [--expert-layout fused]

RUN is the directory format of ``moejax.checkpoint.save_model``: ``train``
starts from it and ``python -m serve export --ckpt RUN`` reads it. Tokenizer files found beside
the HF weights are copied to ``RUN/tokenizer/`` (and back with --to-hf), so a
converted model keeps its vocabulary.

--out must be a new or empty directory; --force writes into a non-empty one
(replacing the files the conversion writes: config.json, model/, tokenizer/ or
the safetensors). The source is never written.

Exit status: 0 converted; 2 bad input (a missing, damaged or unsupported
checkpoint, a tensor of the wrong dtype or shape, an --out that cannot be
used), reported as one `error:` line on stderr with nothing written. The
input is checked (config.json, every safetensors header, --out) before jax
is imported.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from moejax import command_line
from moejax.config import DTYPES, read_config_file
from moejax.convert.checks import check_out, read_hf_config, safetensors_files
from moejax.convert.families import EXPERT_LAYOUTS

DEFAULT_DTYPE = "float32"
DEFAULT_EXPERT_LAYOUT = "per_expert"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``; returns their names."""
    found = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    if found:
        Path(dst).mkdir(parents=True, exist_ok=True)
        for name in found:
            shutil.copy2(Path(src) / name, Path(dst) / name)
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = command_line.OneLineParser(prog="python -m moejax.convert", description=__doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model directory to import")
    source.add_argument("--to-hf", metavar="RUN", help="moejax model directory to export")
    parser.add_argument("--out", required=True, help="directory to write (new or empty)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    # each direction's own option defaults to None so that one given with the other direction is
    # refused instead of silently ignored (--to-hf writes the weights as stored: float32)
    parser.add_argument("--dtype", choices=DTYPES,
                        help=f"--from-hf only: compute dtype stored in the moejax config (parameters "
                             f"stay float32) (default {DEFAULT_DTYPE})")
    parser.add_argument("--expert-layout", choices=EXPERT_LAYOUTS,
                        help=f"--to-hf only: expert tensor layout of the written checkpoint "
                             f"(default {DEFAULT_EXPERT_LAYOUT})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = command_line.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        _check(args)
        return _run(args)
    except (ValueError, KeyError, OSError) as err:  # UnsupportedConfigError, DamagedFileError, ...
        return command_line.report(err)


def _check(args: argparse.Namespace) -> None:
    """Everything that can be checked without jax, before anything is written."""
    out = Path(args.out)
    if not args.out:
        raise ValueError("--out must name a directory")
    if args.to_hf and args.dtype is not None:
        raise ValueError("--dtype applies to --from-hf only (--to-hf writes the weights as stored)")
    if args.from_hf and args.expert_layout is not None:
        raise ValueError("--expert-layout applies to --to-hf only (--from-hf reads either layout)")
    if args.from_hf:
        read_hf_config(args.from_hf)
        safetensors_files(Path(args.from_hf))
        check_out(out, force=args.force, sources=(Path(args.from_hf),))
    else:
        run = Path(args.to_hf)
        read_config_file(run / "config.json")
        if not (run / "model").is_dir():
            raise FileNotFoundError(f"no model/ directory in {run} (a moejax model directory holds "
                                    f"config.json + model/)")
        check_out(out, force=args.force, sources=(Path(args.to_hf),))


def _run(args: argparse.Namespace) -> int:
    from moejax import checkpoint
    from moejax.convert.api import load_hf, save_hf

    if args.from_hf:
        model, cfg = load_hf(args.from_hf, dtype=args.dtype or DEFAULT_DTYPE)
        checkpoint.save_model(args.out, model, cfg)
        copy_tokenizer(args.from_hf, Path(args.out) / "tokenizer")
        print(f"wrote moejax model {cfg.name} ({cfg.n_layers} layers, "
              f"{cfg.num_moe_layers} MoE) to {args.out}")
    else:
        model, cfg = checkpoint.load_model(args.to_hf)
        model_type = save_hf(model, cfg, args.out, expert_layout=args.expert_layout or DEFAULT_EXPERT_LAYOUT)
        copy_tokenizer(Path(args.to_hf) / "tokenizer", args.out)
        print(f"wrote Hugging Face {model_type} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
