"""``python -m moejax.convert``: Hugging Face checkpoints <-> moejax model directories.

    python -m moejax.convert --from-hf HF_DIR --out RUN      # RUN: config.json + orbax model/
    python -m moejax.convert --to-hf RUN --out HF_DIR [--expert-layout fused]

RUN is the directory format of ``moejax.checkpoint.save_model``: ``train``
starts from it (and the serving export, still to come, will read it). Tokenizer files found beside
the HF weights are copied to ``RUN/tokenizer/`` (and back with --to-hf), so a
converted model keeps its vocabulary.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from moejax import checkpoint
from moejax.config import DTYPES
from moejax.convert.api import EXPERT_LAYOUTS, load_hf, save_hf

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "generation_config.json")


def copy_tokenizer(src: str | Path, dst: str | Path) -> list[str]:
    """Copy the tokenizer files present in ``src`` into ``dst``; returns their names."""
    found = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    if found:
        Path(dst).mkdir(parents=True, exist_ok=True)
        for name in found:
            shutil.copy2(Path(src) / name, Path(dst) / name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m moejax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model directory to import")
    source.add_argument("--to-hf", metavar="RUN", help="moejax model directory to export")
    parser.add_argument("--out", required=True, help="directory to write")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="compute dtype stored in the moejax config (parameters stay float32)")
    parser.add_argument("--expert-layout", default="per_expert", choices=EXPERT_LAYOUTS,
                        help="expert tensor layout for --to-hf")
    args = parser.parse_args(argv)
    try:
        return _run(args)
    except (ValueError, KeyError, FileNotFoundError) as err:  # config/option errors: a message, not a trace
        print(f"error: {err}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.from_hf:
        model, cfg = load_hf(args.from_hf, dtype=args.dtype)
        checkpoint.save_model(args.out, model, cfg)
        copy_tokenizer(args.from_hf, Path(args.out) / "tokenizer")
        print(f"wrote moejax model {cfg.name} ({cfg.n_layers} layers, "
              f"{cfg.num_moe_layers} MoE) to {args.out}")
    else:
        model, cfg = checkpoint.load_model(args.to_hf)
        model_type = save_hf(model, cfg, args.out, expert_layout=args.expert_layout)
        copy_tokenizer(Path(args.to_hf) / "tokenizer", args.out)
        print(f"wrote Hugging Face {model_type} checkpoint to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
