"""What every command line of the project shares: one-line errors, validated sizes, and an output folder checked
before any work.

Bad input ends a command with one ``error:`` line on stderr that names the option, file, key or record at fault, and
exit status 2; nothing already written is touched. Parsers are :class:`Parser` (argparse's, with the usage block
left out of errors); sizes use :func:`positive_int` / :func:`at_least` / :func:`fraction` as argparse ``type=``; and
:func:`run_cli` checks ``--out`` (:func:`check_out`) before it runs the command.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "Parser",
    "positive_int",
    "nonnegative_int",
    "at_least",
    "fraction",
    "check_out",
    "run_cli",
    "input_errors",
    "add_model_args",
    "command_line_environment",
]


# The command lines' environment, set when this module is imported (the CLIs import it before anything loads
# transformers, which reads these once): no per-file download bars over ours, no advisory warnings, and the hub
# offline unless the caller's environment says otherwise (the lab's machines cannot reach it; with a network, run
# with HF_HUB_OFFLINE=0 to download Hugging Face ids). Importing the library modules changes no environment variable.
def command_line_environment() -> None:
    """Set the command lines' environment (defaults only: the caller's own settings win), and apply it to the Hugging
    Face modules that may already be imported (they read these variables once, at import)."""
    for key in ("HF_HUB_DISABLE_PROGRESS_BARS", "TRANSFORMERS_NO_ADVISORY_WARNINGS", "HF_HUB_OFFLINE"):
        os.environ.setdefault(key, "1")
    import sys as _sys

    if "huggingface_hub" in _sys.modules:
        from huggingface_hub import constants, utils

        if os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].upper() in ("1", "ON", "YES", "TRUE"):
            utils.disable_progress_bars()
        constants.HF_HUB_OFFLINE = os.environ["HF_HUB_OFFLINE"].upper() in ("1", "ON", "YES", "TRUE")
    if "transformers" in _sys.modules and os.environ["HF_HUB_DISABLE_PROGRESS_BARS"].upper() in (
        "1",
        "ON",
        "YES",
        "TRUE",
    ):
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


command_line_environment()


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: <prog>: <message>``, exit 2), the raw
    description formatter by default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        command_line_environment()  # (a command line builds its parser first: e.g. python -m mechrecall.lab.train)

    def error(self, message: str):
        print(f"error: {self.prog}: {' '.join(message.split())}", file=sys.stderr)
        sys.exit(2)


def at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type=``: an integer >= ``low`` (the message names the bound; argparse adds the option)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


positive_int = at_least(1)
nonnegative_int = at_least(0)


def fraction(text: str) -> float:
    """An argparse ``type=``: a number in (0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return value


def check_out(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be written: an existing file, or a folder (or its nearest
    existing parent) where a file cannot be created. The probe file is removed; nothing is created for a folder that
    does not exist yet (it is made when results are written)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {str(path)!r} is a file, not a folder")
    probe_in = path
    while not probe_in.exists():
        if probe_in.parent == probe_in:
            break
        probe_in = probe_in.parent
    if not probe_in.is_dir():
        raise ValueError(f"{option} {str(path)!r}: {str(probe_in)!r} is a file, so no folder can be made below it")
    try:
        fd, probe = tempfile.mkstemp(dir=probe_in, prefix=".mechrecall-write-probe.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ValueError(f"{option} {str(path)!r} cannot be written ({e.strerror or e} in {str(probe_in)!r})") from None
    return path


def input_errors() -> tuple[type[Exception], ...]:
    """What a CLI reports as bad input (one line on stderr, exit status 2) rather than as a crash.

    Unknown or broken checkpoints, registry entries, devices and dtypes, architectures :mod:`mechrecall.arch` does
    not know, malformed fact records and roles that land on no token; plus ``ValueError`` (bad option combinations,
    facts that cannot be paired) and ``FileNotFoundError``.
    """
    return (ValueError, FileNotFoundError)  # every mechrecall input error above is a ValueError


def run_cli(fn, args) -> int:
    """``fn(args)`` -> its exit status, after checking ``args.out`` (when the command has one) with
    :func:`check_out`; bad input (:func:`input_errors`) -> ``error: <message>`` on one stderr line and status 2.
    ``MECHRECALL_TRACEBACK=1`` re-raises instead (for debugging)."""
    try:
        if getattr(args, "out", None):
            check_out(args.out)
        return fn(args)
    except input_errors() as e:
        if os.environ.get("MECHRECALL_TRACEBACK") == "1":
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {msg}", file=sys.stderr)
        return 2


def add_model_args(ap, *, device: bool = True) -> None:
    """``--device`` (default: CUDA when available, else CPU) and ``--dtype`` (default float32) on a parser."""
    from mechrecall.devices import DTYPES, default_device

    ap.add_argument("--device", default=default_device(),
                    help="cpu, cuda, cuda:N, mps, or map:auto to shard over the GPUs with a Hugging Face device_map "
                         "(default: %(default)s)")  # fmt: skip
    ap.add_argument("--dtype", default="float32", help=f"{', '.join(sorted(DTYPES))} (default: %(default)s)")
