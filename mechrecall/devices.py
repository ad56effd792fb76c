"""Where a model lives and in which precision: device and dtype resolution for functions, loaders and CLIs.

Every toolkit function runs where the model lives: inputs are moved to :func:`model_device`, results come back to
the CPU in float32 where they are stored or reduced. CLIs take ``--device`` (default :func:`default_device`: CUDA when
available, else CPU) and ``--dtype``; :func:`resolve_device` and :func:`resolve_dtype` turn those strings into torch
objects and refuse what this machine cannot run with one clear line.
"""

from __future__ import annotations

import functools
import time
import warnings
from pathlib import Path

import torch

__all__ = [
    "available_memory",
    "MemoryEstimateError",
    "check_memory",
    "cpu_bf16_speed",
    "DTYPES",
    "DeviceError",
    "default_device",
    "resolve_device",
    "resolve_dtype",
    "model_device",
    "nbytes",
    "release_memory",
    "model_dtype",
    "to_cpu",
]

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


class DeviceError(ValueError):
    """A device or dtype this machine cannot run (the message names it)."""


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    return "cpu"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/``"auto"`` -> the default; refuses ``cuda`` without a GPU and ``mps`` without Metal."""
    if device is None or str(device) == "auto":
        return torch.device(default_device())
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise DeviceError(f"--device {device!r}: not a torch device (cpu, cuda, cuda:N, mps)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {device!r}: no CUDA GPU is available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise DeviceError(f"--device {device!r}: MPS is not available on this machine")
    return dev


@functools.lru_cache(maxsize=1)
def cpu_bf16_speed() -> float:
    """This CPU's bf16 matmul rate over its float32 rate (a 256 x 256 product, best of 3, one thread; ~0.1 s).

    Measured, not read from CPU flags, because what matters is the kernel torch picks: about 2.6 on a CPU with
    AVX-512 BF16 (this project's first machine), about 0.02 on one with AVX2 alone, where bf16 is emulated (a later
    2-core AMD EPYC host: 0.3 against 15.6 GFLOP/s on a 1024 x 1024 product)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = {}
        for dt in (torch.float32, torch.bfloat16):
            a = torch.ones(256, 256, dtype=dt)
            times = []
            for _ in range(3):
                t0 = time.perf_counter()
                a @ a
                times.append(time.perf_counter() - t0)
            best[dt] = min(times)
    finally:
        torch.set_num_threads(threads)
    return best[torch.float32] / max(best[torch.bfloat16], 1e-9)


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> torch.dtype:
    """``"float32"``/``"bf16"``/``"fp16"``/... -> a torch dtype; refuses one the device cannot run, and warns (once)
    when bf16 on this CPU is emulated (:func:`cpu_bf16_speed` below 0.5: slower than float32, not faster)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        out = dtype
    elif str(dtype) in DTYPES:
        out = DTYPES[str(dtype)]
    else:
        raise DeviceError(f"--dtype {dtype!r}: unknown; expected one of {', '.join(sorted(set(DTYPES)))}")
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if out == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise DeviceError(f"--dtype {dtype!r}: this GPU does not support bfloat16")
    if out == torch.bfloat16 and dev.type == "cpu":
        _warn_if_bf16_emulated()
    if out == torch.float16 and dev.type == "cpu":
        # CPU fp16 matmuls are supported by current torch but slow and poorly accumulated; allowed, not advised
        pass
    return out


@functools.lru_cache(maxsize=1)
def _warn_if_bf16_emulated() -> None:
    speed = cpu_bf16_speed()
    if speed < 0.5:
        warnings.warn(
            f"bf16 on this CPU runs matrix products at {speed:.2f}x the float32 rate (no native bf16 kernels, e.g. "
            f"AVX2 only): bf16 here is slower, not faster; float32 is advised",
            stacklevel=3,
        )


def model_device(model) -> torch.device:
    """The device of the model's input embedding (the first module an input meets; right for ``device_map`` too)."""
    if hasattr(model, "get_input_embeddings"):
        emb = model.get_input_embeddings()
        if emb is not None:
            return emb.weight.device
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")  # a parameter-free stand-in runs on the CPU


def model_dtype(model) -> torch.dtype:
    return next(model.parameters()).dtype


def to_cpu(x: torch.Tensor) -> torch.Tensor:
    """Storage comes back to the CPU as float32 (for floating tensors), whatever the model's dtype."""
    x = x.detach()
    return (x.float() if x.is_floating_point() else x).cpu()


def nbytes(tensors) -> int:
    """Bytes held by an iterable of tensors (a gradient dict's ``.values()``, a model's ``.parameters()``)."""
    return sum(t.numel() * t.element_size() for t in tensors)


# Below this many freed bytes a trim costs more than it returns (the lab models' whole batches are a few MB).
RELEASE_THRESHOLD = 1 << 28


def release_memory(freed_bytes: int | None = None) -> None:
    """Hand freed host memory back to the system (and CUDA's cache, where there is one).

    Loops that allocate and free gigabytes of tensors per iteration (per-example gradients of a 135M-parameter model)
    leave glibc's heap fragmented: the freed blocks stay in the process, and the resident size grew by about 1.6 GB a
    batch on SmolLM2 until the kernel killed the process. ``gc.collect`` frees what reference cycles hold and
    ``malloc_trim(0)`` returns the heap's free pages; neither changes any number. With ``freed_bytes`` (what the
    caller just dropped; the gradients alone, vmap's intermediates come on top) nothing is done below
    :data:`RELEASE_THRESHOLD`, so one rule serves every loop."""
    if freed_bytes is not None and freed_bytes <= RELEASE_THRESHOLD:
        return
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    name = ctypes.util.find_library("c")
    if name:
        try:
            ctypes.CDLL(name).malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
            pass
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class MemoryEstimateError(ValueError):
    """A computation would need more memory than the device has free (raised before it allocates)."""


def available_memory(device: str | torch.device) -> int:
    """Bytes free on ``device`` now: CUDA's free memory, or the host's available memory (``/proc/meminfo``'s
    MemAvailable, which counts reclaimable caches) for the CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        # blocks PyTorch's caching allocator holds but does not use are free to this process too
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import psutil  # (not Linux)

    return int(psutil.virtual_memory().available)


def check_memory(what: str, needed: int, device: str | torch.device, remedies: str) -> None:
    """Raise :class:`MemoryEstimateError` (one line: what, how much it needs, how much is free, what would fit) when
    ``needed`` bytes exceed what ``device`` has free."""
    free = available_memory(device)
    if needed > free:
        raise MemoryEstimateError(
            f"{what} needs about {needed / 2**30:.1f} GiB on {device} and {free / 2**30:.1f} GiB are free: {remedies}"
        )
