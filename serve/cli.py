"""``python -m serve``: export | generate | http | trace-sim.

Bad input (a missing checkpoint, an existing --out, a bad sampling value, a
prompt over the context) is one ``error:`` line on stderr and exit status 2,
never a traceback -- the convention of ``python -m train``.
"""

from __future__ import annotations

import argparse
import sys
import time

from moejax import command_line
from serve.offload.config import BUDGETS, STORES, OffloadConfig
from serve.offload.policies import POLICIES

EXAMPLES = """\
examples:
  python -m serve export --ckpt runs/tiny --out serving/tiny [--dtype bfloat16] [--quantize int8]
  python -m serve generate --model serving/tiny --prompt "def " --max-new-tokens 64 --stats
  python -m serve http --model serving/tiny --port 8000 [--chat-template chat.jinja]
  python -m serve generate --model serving/tiny --prompt "def " --offload --slots-per-layer 2 --stats
  python -m serve trace-sim --model serving/tiny --out trace_sim/tiny
"""


# OffloadConfig field -> the flag that sets it
OFFLOAD_FLAGS = {"slots_per_layer": "--slots-per-layer", "policy": "--policy", "prefetch": "--no-prefetch",
                 "store": "--store", "budgets": "--budgets", "trace": "--trace"}


class CLIError(ValueError):
    """Bad command-line input: reported as one error line, exit 2."""


def build_parser() -> argparse.ArgumentParser:
    p = command_line.OneLineParser(prog="python -m serve", description=__doc__, epilog=EXAMPLES)
    sub = p.add_subparsers(dest="command", required=True, parser_class=command_line.OneLineParser)
    ex = sub.add_parser("export", help="write a serving checkpoint")
    ex.add_argument("--ckpt", required=True, help="training run or model directory")
    ex.add_argument("--out", required=True, help="serving checkpoint directory to write")
    ex.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                    help="weight and compute dtype (norms, router, embedding stay float32)")
    ex.add_argument("--quantize", choices=("int8",), help="weight-only int8 routed experts")
    ex.add_argument("--force", action="store_true", help="replace an existing --out")

    def engine_args(q):
        q.add_argument("--model", required=True, help="serving checkpoint directory")
        q.add_argument("--slots", type=int, default=8, help="batch slots (concurrent requests)")
        q.add_argument("--max-len", type=int, default=None, help="context per slot (default: the model's)")
        q.add_argument("--chunk", type=int, default=64, help="prefill chunk (tokens per slot per step)")
        # the offload flags default to None (OffloadConfig's defaults, named in the help) so that
        # one given without --offload is an error, not silently a resident engine
        d = OffloadConfig()
        off = q.add_argument_group("expert offload (routed experts in host memory or on disk; "
                                   "the flags below need --offload)")
        off.add_argument("--offload", action="store_true", help="keep routed experts off the device")
        off.add_argument("--slots-per-layer", type=int,
                         help=f"device slots per MoE layer (default {d.slots_per_layer})")
        off.add_argument("--policy", choices=tuple(POLICIES),
                         help=f"expert cache policy; static needs --trace (default {d.policy})")
        off.add_argument("--no-prefetch", dest="prefetch", action="store_const", const=False,
                         help="no router-predicted prefetch of the next layer's experts")
        off.add_argument("--store", choices=STORES,
                         help=f"host (pinned host memory) | disk (read per copy) (default {d.store})")
        off.add_argument("--budgets", choices=BUDGETS,
                         help=f"uniform | trace (slots per layer from --trace) (default {d.budgets})")
        off.add_argument("--trace", help="routing trace (.npz from trace-sim) for static / trace budgets")

    gen = sub.add_parser("generate", help="generate text for one or more prompts")
    engine_args(gen)
    gen.add_argument("--prompt", action="append", required=True, help="prompt text (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate per prompt")
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy; in [0, 100]")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]; 1: off")
    gen.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens; 0: off")
    gen.add_argument("--seed", type=int, default=0, help="sampling seed")
    gen.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    gen.add_argument("--stats", action="store_true", help="print tokens/s and time to first token")

    http = sub.add_parser("http", help="OpenAI-compatible HTTP server")
    engine_args(http)
    http.add_argument("--host", default="127.0.0.1", help="address to listen on")
    http.add_argument("--port", type=int, default=8000, help="TCP port in [0, 65535]")
    http.add_argument("--max-queue", type=int, default=64, help="waiting requests before 429")
    http.add_argument("--max-body", type=int, default=1 << 20, help="largest request body in bytes")
    http.add_argument("--name", default=None, help="model id shown by /v1/models (default: dir name)")
    http.add_argument("--chat-template", default=None,
                      help="Jinja chat template (or a tokenizer_config.json holding one) for "
                           "/v1/chat/completions, in place of the one the model's tokenizer ships")

    from serve.offload import tracesim_cli
    tracesim_cli.add_parser(sub)
    return p


def _positive(args, *names):
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def run_export(args) -> int:
    from serve.export import export
    manifest = export(args.ckpt, args.out, dtype=args.dtype, quantize=args.quantize, force=args.force)
    n = sum(e["num_experts"] for e in manifest["experts"].values())
    print(f"wrote serving checkpoint {args.out} ({args.dtype}{', int8 experts' if args.quantize else ''}; "
          f"{len(manifest['experts'])} MoE layers, {n} experts; tokenizer {manifest['tokenizer']['kind']})")
    return 0


def load_engine(args, **kwargs):
    from serve.engine import Engine
    given = {name: getattr(args, name) for name in OFFLOAD_FLAGS if getattr(args, name) is not None}
    if given and not args.offload:
        raise CLIError(f"{OFFLOAD_FLAGS[next(iter(given))]} applies to offloaded experts only: add --offload")
    if args.offload:
        kwargs["offload"] = OffloadConfig(**given)
    return Engine.load(args.model, num_slots=args.slots, max_len=args.max_len, max_chunk=args.chunk, **kwargs)


def run_trace_sim(args) -> int:
    from serve.offload import tracesim_cli
    return tracesim_cli.main(args)


def run_generate(args) -> int:
    from serve.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.seed, stop=tuple(args.stop or ()))
    start = time.perf_counter()
    engine = load_engine(args)
    loaded = time.perf_counter()
    requests = [engine.make_request(p, params) for p in args.prompt]   # bad prompts fail before compiling
    if args.stats:
        engine.warmup()                   # compile every step shape now, so the figures are decode only
    compiled = time.perf_counter()
    outs = engine.generate([r.prompt for r in requests], max_new_tokens=params.max_new_tokens,
                           temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
                           seed=params.seed, stop=params.stop)
    end = time.perf_counter()
    for out in outs:
        print(out.text, flush=True)
    if args.stats:
        print_stats(engine, outs, load_s=loaded - start, compile_s=compiled - loaded, run_s=end - compiled)
    return 0


def print_stats(engine, outs, *, load_s: float, compile_s: float, run_s: float) -> None:
    """Throughput and latency on stderr; then any plug-in figures (e.g. the expert store)."""
    tokens = sum(len(o.tokens) for o in outs)
    ttft = max(o.time_to_first_token or 0.0 for o in outs)
    after_first = sum(max(len(o.tokens) - 1, 0) for o in outs)
    decode_s = max(max(o.latency for o in outs) - ttft, 1e-9)
    print(f"[stats] load {load_s:.2f} s, compile {compile_s:.2f} s; {tokens} tokens in {run_s:.2f} s "
          f"({tokens / max(run_s, 1e-9):.1f} tokens/s); time to first token {ttft * 1e3:.0f} ms; "
          f"decode {after_first / decode_s:.1f} tokens/s over {len(outs)} request(s)", file=sys.stderr)
    for name, figures in engine.stats().items():
        if isinstance(figures, dict) and name != "requests_finished":
            print(f"[stats] {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()), file=sys.stderr)


def run_http(args) -> int:
    import dataclasses

    from serve.chat import ChatTemplate
    from serve.http import serve_forever
    chat = None if args.chat_template is None else ChatTemplate.from_file(args.chat_template)
    engine = load_engine(args, max_waiting=args.max_queue)
    if chat is not None:      # a bare Jinja file uses the special tokens the tokenizer ships
        if not chat.special_tokens:
            chat = dataclasses.replace(chat, special_tokens=dict(engine.tokenizer.special_tokens))
        engine.tokenizer.chat_template = chat
    return serve_forever(engine, host=args.host, port=args.port, max_body=args.max_body,
                         model_name=args.name)


def main(argv: list[str] | None = None) -> int:
    args = command_line.parse(build_parser(), argv)
    if isinstance(args, int):
        return args
    from serve.export import ExportError
    from serve.sampling import RequestError
    from serve.tokenizer import TokenizerError
    from moejax.config import ConfigError
    from serve.offload.config import OffloadConfigError
    from serve.tensorfile import TensorFileError
    from serve.engine import EngineConfigError
    try:
        _positive(args, "slots", "max_len", "chunk", "max_new_tokens", "max_queue", "max_body",
                  "batch_size", "slots_per_layer")
        if args.command == "http" and not 0 <= args.port < 65536:
            raise CLIError(f"--port must be in [0, 65535], got {args.port}")
        _quiet_libraries()
        commands = {"export": run_export, "generate": run_generate, "http": run_http,
                    "trace-sim": run_trace_sim}
        return commands[args.command](args)
    except (CLIError, ExportError, RequestError, TokenizerError, ConfigError, OffloadConfigError,
            TensorFileError, EngineConfigError, OSError) as err:
        return command_line.report(err)


def _quiet_libraries() -> None:
    import logging
    logging.getLogger("absl").setLevel(logging.ERROR)
