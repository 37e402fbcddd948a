"""serve: serving checkpoints, a continuous-batching engine and an OpenAI-compatible server.

    python -m serve export --ckpt runs/tiny --out serving/tiny
    engine = serve.Engine.load("serving/tiny")
    outs = engine.generate(["def main("], max_new_tokens=32)
"""

from serve.engine import Engine, EngineStopped, Output
from serve.export import ExportError, export
from serve.offload.config import OffloadConfig, OffloadConfigError
from serve.sampling import RequestError, SamplingParams
from serve.scheduler import QueueFull

__all__ = ["Engine", "EngineStopped", "ExportError", "OffloadConfig", "OffloadConfigError", "Output",
           "QueueFull", "RequestError", "SamplingParams", "export"]
