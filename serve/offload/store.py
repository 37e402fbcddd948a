"""Where the routed experts live when they are not in a device slot: host memory or disk.

Every store holds, for each MoE layer, the E experts' tensors (the leaves of
the layer's experts object, e.g. ``w_gate``, ``w_up``, ``w_down``, or int8
weights and scales) and hands out one expert at a time, already on its way
to the device (``jax.device_put`` is asynchronous).

- :class:`HostStore`: one array per expert in host memory. Where the backend
  has a ``pinned_host`` memory kind (GPU, TPU, and XLA:CPU) the arrays are
  placed there, so host->device copies are DMA from page-locked memory;
  elsewhere they stay numpy arrays.
- :class:`DiskStore`: the serving checkpoint's experts file, memory-mapped;
  each fetch reads the expert's tensors straight from the file (counted in
  ``bytes_from_disk``), so a model larger than the host RAM budget serves.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

_SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "I8": np.int8, "U8": np.uint8,
                       "I32": np.int32, "I64": np.int64, "F64": np.float64}


def _np_dtype(code: str) -> np.dtype:
    if code == "BF16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    if code not in _SAFETENSORS_DTYPES:
        raise ValueError(f"DiskStore: unsupported safetensors dtype {code}")
    return np.dtype(_SAFETENSORS_DTYPES[code])


def memory_kinds(device=None) -> tuple[str, ...]:
    device = device or jax.devices()[0]
    try:
        return tuple(m.kind for m in device.addressable_memories())
    except Exception:  # backends without memory spaces
        return ()


def host_sharding(device=None):
    """A sharding in pinned host memory, or None where the backend has no such memory kind."""
    device = device or jax.devices()[0]
    if "pinned_host" not in memory_kinds(device):
        return None
    return jax.sharding.SingleDeviceSharding(device, memory_kind="pinned_host")


def device_sharding(device=None):
    device = device or jax.devices()[0]
    kind = "device" if "device" in memory_kinds(device) else None
    return jax.sharding.SingleDeviceSharding(device, memory_kind=kind)


class ExpertStore:
    """Common interface: ``fetch(layer, expert) -> {name: device array}`` and byte counters."""

    names: tuple[str, ...]
    num_layers: int
    num_experts: int
    expert_bytes: int

    def __init__(self):
        self.bytes_to_device = 0
        self.bytes_from_disk = 0
        self._to_device = device_sharding()

    def host_arrays(self, layer: int, expert: int) -> dict[str, np.ndarray | jax.Array]:
        raise NotImplementedError

    def fetch(self, layer: int, expert: int) -> dict[str, jax.Array]:
        """Start the copy of one expert to the device (asynchronous)."""
        arrays = self.host_arrays(layer, expert)
        self.bytes_to_device += self.expert_bytes
        return {n: jax.device_put(a, self._to_device) for n, a in arrays.items()}

    def shapes(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """Per-expert shape and dtype of each tensor."""
        arrays = self.host_arrays(0, 0)
        return {n: (tuple(a.shape), np.dtype(a.dtype)) for n, a in arrays.items()}


class HostStore(ExpertStore):
    """Experts in host memory (pinned where available), from stacked [E, ...] arrays per layer."""

    def __init__(self, layers: list[dict[str, np.ndarray]], *, pin: bool = True):
        super().__init__()
        if not layers:
            raise ValueError("HostStore: no MoE layers")
        self.names = tuple(layers[0])
        self.num_layers = len(layers)
        self.num_experts = int(next(iter(layers[0].values())).shape[0])
        sharding = host_sharding() if pin else None
        self.memory_kind = "pinned_host" if sharding is not None else "numpy"
        self._experts = []
        for stacked in layers:
            if tuple(stacked) != self.names:
                raise ValueError(f"HostStore: layers disagree on expert tensors: {tuple(stacked)} "
                                 f"vs {self.names}")
            per_expert = []
            for e in range(self.num_experts):
                arrays = {n: np.ascontiguousarray(np.asarray(a[e])) for n, a in stacked.items()}
                if sharding is not None:
                    arrays = {n: jax.device_put(a, sharding) for n, a in arrays.items()}
                per_expert.append(arrays)
            self._experts.append(per_expert)
        self.expert_bytes = sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
                                for a in self._experts[0][0].values())

    def host_arrays(self, layer, expert):
        return self._experts[layer][expert]


class DiskStore(ExpertStore):
    """Experts read from a memory-mapped safetensors file, one contiguous range per expert.

    ``tensor_names[layer][expert]`` lists, per expert tensor name, the name of
    that tensor in the file (e.g. ``{"w_gate": "layers.1.ffn.experts.3.w_gate", ...}``).
    """

    def __init__(self, path: str | Path, tensor_names: list[list[dict[str, str]]]):
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"DiskStore: no experts file {self.path}")
        with open(self.path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self._header, self._start = header, 8 + size
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        self._names = tensor_names
        self.num_layers, self.num_experts = len(tensor_names), len(tensor_names[0])
        self.names = tuple(tensor_names[0][0])
        for layer in tensor_names:
            for entry in layer:
                missing = [t for t in entry.values() if t not in header]
                if missing:
                    raise ValueError(f"DiskStore: {self.path} has no tensor {missing[0]!r}")
        self.expert_bytes = sum(self._range(t)[1] - self._range(t)[0]
                                for t in tensor_names[0][0].values())

    def _range(self, tensor: str) -> tuple[int, int]:
        begin, end = self._header[tensor]["data_offsets"]
        return self._start + begin, self._start + end

    def _read(self, tensor: str) -> np.ndarray:
        info = self._header[tensor]
        dtype = _np_dtype(info["dtype"])
        begin, end = self._range(tensor)
        self.bytes_from_disk += end - begin
        # np.array copies: the bytes are read from the file here, not lazily on the device side
        return np.array(self._map[begin:end]).view(dtype).reshape(info["shape"])

    def host_arrays(self, layer, expert):
        return {n: self._read(t) for n, t in self._names[layer][expert].items()}

    def shapes(self):
        return {n: (tuple(self._header[t]["shape"]), _np_dtype(self._header[t]["dtype"]))
                for n, t in self._names[0][0].items()}
