"""``python -m train``: the command line.

Exit status (also in ``--help``): 0 done; 2 bad input, reported as one
``error:`` line on stderr (flags, data, the run directory, a checkpoint of
another model, a file-system error on a path it was given); 3 a non-finite
loss (the last good checkpoint is kept); 130/143 stopped by SIGINT/SIGTERM
after saving a checkpoint (130 with nothing saved: a SIGINT during set-up, or a
second SIGINT). Flags, paths and data are checked before jax is
imported, so bad input fails in well under a second and writes nothing.
"""

from __future__ import annotations

import argparse

from moejax import command_line
from train.config import TrainConfig, TrainError

DESCRIPTION = """\
Train a moejax model. With no flags: the `tiny` MoE preset on the built-in
corpus (the source code of this Python's standard library, byte-level), a
few minutes on a laptop CPU, with validation loss (nats/token and bits/byte)
printed as it falls.

--out DIR is the run directory and decides where the run starts:
  * DIR holds checkpoints (DIR/checkpoints/<step>/): resume the latest one
    exactly (parameters, optimizer, router biases, data order, RNG);
  * DIR holds only a model directory (DIR/config.json + DIR/model/, as
    written by moejax.checkpoint.save_model or `python -m moejax.convert
    --from-hf HF_DIR --out DIR`): start from those weights with a fresh
    optimizer at step 0;
  * otherwise: a fresh model from --preset (default tiny) and --set.
--resume insists on one of the first two. When DIR already holds a model,
--preset/--set must match it (they may be omitted; --set dtype, moe.dtype and
remat may change it, scan_layers may not), and so must the data's token ids
(< vocab_size). A DIR that is not empty and holds no run is only
written into with --force. A damaged newest checkpoint is reported, renamed
<step>.damaged (kept) and the run resumes from the one before.

Written to DIR: config.json + model/ (final weights, loadable with
moejax.checkpoint.load_model), checkpoints/ (async, atomic, last --keep
kept), metrics.jsonl (one record per logged step), tb/ (TensorBoard),
training.png (loss curves, expert-load heatmap), summary.json.
SIGTERM/SIGINT save a checkpoint and exit (143/130); rerun to resume.

Exit status: 0 done; 2 bad input or an unusable path (one `error:` line on
stderr, nothing written); 3 non-finite loss (last good checkpoint kept);
130/143 stopped by SIGINT/SIGTERM after saving a checkpoint (130 with nothing
saved for a SIGINT during set-up or a second SIGINT).
"""

EXAMPLES = """\
examples:
  python -m train
  python -m train --preset tiny --steps 300 --out runs/tiny --checkpoint-every 100
  python -m train --data 'src/**/*.py' --mesh data=2,expert=4 --dtype bfloat16
  python -m train --data corpus.txt --tokenizer tokenizer.json --set n_layers=2
"""


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = command_line.OneLineParser(prog="python -m train", description=DESCRIPTION, epilog=EXAMPLES)
    run = p.add_argument_group("run")
    run.add_argument("--out", default=d.out, help="run directory")
    run.add_argument("--preset", help="model preset (default: the model in --out, else tiny)")
    run.add_argument("--set", dest="model_overrides", action="append", default=[], metavar="FIELD=VALUE",
                     help="override a model field, e.g. n_layers=2 or moe.num_experts=4 (repeatable)")
    run.add_argument("--steps", type=int, default=d.steps, help="total steps")
    run.add_argument("--resume", action="store_true",
                     help="require a checkpoint or model in --out (resuming is automatic anyway)")
    run.add_argument("--seed", type=int, default=d.seed, help="init and data-order seed")
    run.add_argument("--force", action="store_true",
                     help="write into a non-empty --out that holds no run (its files named like "
                          "the run's outputs are replaced)")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="text file, directory or glob; or a token array (.npy, or "
                                     ".bin = raw uint16). Default: the Python standard library")
    data.add_argument("--tokenizer", help="Hugging Face tokenizer.json for text data (default: the "
                                          "tokenizer of the model in --out, as its last run named "
                                          "it or convert copied it to DIR/tokenizer/; else bytes)")
    data.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch (sequences)")
    data.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens per sequence")
    opt = p.add_argument_group("optimizer (AdamW, linear warmup + cosine decay)")
    opt.add_argument("--lr", type=float, default=d.lr, help="peak learning rate")
    opt.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, help="final lr / peak lr")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                     help="linear warmup from 0 (cut to --steps - 1: a longer one ends at the last step, no decay)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="on matrices only")
    opt.add_argument("--beta1", type=float, default=d.beta1, help="Adam first-moment decay")
    opt.add_argument("--beta2", type=float, default=d.beta2, help="Adam second-moment decay")
    opt.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global-norm clip (0: off)")
    opt.add_argument("--param-group", dest="param_groups", action="append", default=[],
                     metavar="REGEX=LR_MULT", help="scale the lr of parameters whose path matches, "
                     "e.g. 'layers/0/.*=0.5' (repeatable; first match wins)")
    opt.add_argument("--memory-lr-mult", type=float, default=d.memory_lr_mult,
                     help="lr multiplier of memory-layer value tables (parameters named mem_values: "
                     "product-key values, Engram rows); they never get weight decay")
    par = p.add_argument_group("precision and parallelism")
    par.add_argument("--dtype", choices=("float32", "bfloat16"),
                     help="compute dtype (parameters and optimizer state stay float32); "
                          "default: the model's (float32)")
    par.add_argument("--remat", choices=("none", "full", "dots"),
                     help="recompute activations in the backward pass: full (keep block inputs only) "
                          "or dots (keep matmul outputs); default: the model's (none)")
    par.add_argument("--mesh", help="device mesh, e.g. data=2,expert=4 (axes data, fsdp, expert, "
                                    "tensor; product = device count). Default: data=<devices>")
    io = p.add_argument_group("logging and checkpoints")
    io.add_argument("--log-every", type=int, default=d.log_every, help="steps per metrics record")
    io.add_argument("--eval-every", type=int, default=d.eval_every, help="steps per validation")
    io.add_argument("--eval-batches", type=int, default=d.eval_batches,
                    help="fixed validation batches per evaluation")
    io.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every,
                    help="steps per checkpoint (one is also written at the end)")
    io.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    io.add_argument("--sync-checkpoint", dest="async_checkpoint", action="store_false",
                    help="write checkpoints synchronously")
    io.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    io.add_argument("--no-plot", dest="plot", action="store_false")
    return p


def config_from_args(namespace: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed arguments (raises TrainError on values that do not fit)."""
    args = vars(namespace)
    args["model_overrides"] = tuple(args["model_overrides"])
    args["param_groups"] = tuple(args["param_groups"])
    return TrainConfig(**args)


def _quiet_libraries() -> None:
    import logging
    try:
        from absl import logging as absl_logging
        absl_logging.set_verbosity(absl_logging.ERROR)
    except ImportError:
        pass
    logging.getLogger("absl").setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    args = command_line.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    try:
        cfg = config_from_args(args)
    except TrainError as err:
        return command_line.report(err)
    try:
        from train.start import preflight
        corpus, start = preflight(cfg)  # no jax yet: bad input fails fast
        _quiet_libraries()
        from train.loop import run
        return run(cfg, corpus, start)
    except TrainError as err:
        return command_line.report(err, err.exit_code)
    except OSError as err:  # a path that cannot be used: disk full, I/O error, ...
        return command_line.report(err)
    except KeyboardInterrupt:  # Ctrl-C outside the loop's handler (set-up, first eval) or a second one
        return command_line.report(TrainError(
            f"interrupted by SIGINT outside a training step, nothing saved now; run the same command "
            f"again to resume from the newest checkpoint in {cfg.out}/checkpoints, if any"), 130)
