"""Load DeepSpeed's checkpoint files without running code from them.

DeepSpeed's engine files (``mp_rank_*_model_states.pt``, ``*_optim_states.pt``, the universal
checkpoint's ``zero/*/*.pt``) are torch pickles, and DeepSpeed reads them with
``torch.load(weights_only=False)``: a crafted file runs any command when it is loaded. Inside
:func:`restricted_torch_load` every ``torch.load`` of the process, DeepSpeed's included, uses torch's
weights-only unpickler, which builds tensors, containers and plain values and, beyond those, only the
few DeepSpeed classes in :data:`ALLOWED` (found by loading real checkpoints of every precision with
``weights_only=True``). Anything else is refused with a :class:`RefusedCheckpoint` naming the file.

DeepSpeed calls ``torch.load`` through the ``torch`` module everywhere on its save/load path
(``runtime.checkpoint_engine.torch_checkpoint_engine`` for the engine, ``utils.zero_to_fp32``,
``checkpoint.ds_to_universal``, ``checkpoint.universal_checkpoint``), so patching ``torch.load``
covers them; a name any loaded module bound with ``from torch import load`` is patched too.

``python -m pipeline.engine.safe_load MODULE ARGS...`` runs ``python -m MODULE ARGS...`` inside the
context (used for DeepSpeed's ``ds_to_universal`` converter, which runs in a subprocess); a refusal
exits with code 2 and prints the message after :data:`REFUSED_PREFIX` on stderr.
"""

from __future__ import annotations

import importlib
import os
import pickle
import re
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.serialization

from pipeline.errors import UserError

REFUSED_PREFIX = "refused-checkpoint: "


class RefusedCheckpoint(UserError):
    """A checkpoint file holds objects other than tensors and DeepSpeed's state; it was not loaded."""


# The non-tensor classes DeepSpeed 0.19's ZeRO-1/2 checkpoint files hold (fp32, bf16 and fp16 runs),
# found by loading real checkpoints with weights_only=True (tests/test_untrusted.py keeps them honest).
# Each is rebuilt from plain values only (an enum lookup, a dataclass, a dict of numbers).
ALLOWED = (
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # optim states: the static scaler (fp32, bf16)
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",  # optim states: fp16's dynamic scaler
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # optim states: the ZeRO stage
    "deepspeed.utils.tensor_fragment.fragment_address",  # optim states: param_slice_mappings
)


def _allowed() -> list[Callable]:
    """The classes of :data:`ALLOWED`, imported when the context is entered (DeepSpeed is heavy)."""
    out = []
    for name in ALLOWED:
        module, _, attr = name.rpartition(".")
        out.append(getattr(importlib.import_module(module), attr))
    return out


_lock = threading.RLock()
_depth = 0
_hint = ""
_original: Callable[..., Any] = torch.serialization.load
_patched: list[tuple[object, str]] = []  # (module, attribute) bound to the original load


def _describe(err: BaseException) -> str:
    """The refused global of torch's long weights-only message, else its first line."""
    text = str(err)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return f"it references {found.group(1)}"
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), type(err).__name__)[:200]


def _restricted(f: Any, map_location: Any = None, pickle_module: Any = None, **kwargs: Any) -> Any:
    """``torch.load`` with ``weights_only=True`` forced while the context is active."""
    if _depth == 0:  # a name bound while the context was active, called after it ended
        return _original(f, map_location, pickle_module, **kwargs)
    kwargs["weights_only"] = True  # and no custom unpickler: torch refuses one with weights_only
    try:
        return _original(f, map_location, None, **kwargs)
    except (pickle.UnpicklingError, RuntimeError) as e:
        if isinstance(e, RuntimeError) and "weights_only" not in str(e):
            raise
        name = os.fspath(f) if isinstance(f, (str, os.PathLike)) else getattr(f, "name", "a file object")
        raise RefusedCheckpoint(
            f"{name}: refused to load it: the file holds objects other than tensors and "
            f"DeepSpeed's checkpoint state ({_describe(e)}); nothing in it was run{_hint}"
        ) from None


def _bind() -> None:
    """Point ``torch.load`` and every name any loaded module bound to it at the restricted loader."""
    _patched.clear()
    this = sys.modules[__name__]  # also registered as __mp_main__ when run with -m
    for name, mod in list(sys.modules.items()):
        if mod is this or name == "pipeline.engine.safe_load":  # our own _original, imported or run
            continue
        for attr, value in list(getattr(mod, "__dict__", {}).items()):
            if value is _original:
                _patched.append((mod, attr))
    for mod, attr in _patched:
        setattr(mod, attr, _restricted)


def _unbind() -> None:
    for mod, attr in _patched:
        setattr(mod, attr, _original)
    _patched.clear()


@contextmanager
def restricted_torch_load(hint: str = "") -> Iterator[None]:
    """While active, every ``torch.load`` unpickles only tensors, plain values and :data:`ALLOWED`;
    anything else raises :class:`RefusedCheckpoint` (a UserError: one line, exit code 2). ``hint`` is
    appended to that message (what to load instead). Re-entrant; process-wide while active."""
    global _depth, _hint
    with _lock:
        outer = _depth == 0
        if outer:
            safe = torch.serialization.safe_globals(_allowed())
            safe.__enter__()
            _bind()
            _hint = f"; {hint}" if hint else ""
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if outer:
                _unbind()
                safe.__exit__(None, None, None)
                _hint = ""


def main(argv: list[str]) -> int:
    """``python -m pipeline.engine.safe_load MODULE ARGS...``: run a module as ``__main__`` inside the
    context (DeepSpeed's ``ds_to_universal`` runs in a subprocess of its own)."""
    import runpy

    if not argv:
        print("usage: python -m pipeline.engine.safe_load MODULE [ARGS...]", file=sys.stderr)
        return 2
    sys.argv = [argv[0], *argv[1:]]
    try:
        with restricted_torch_load():
            runpy.run_module(argv[0], run_name="__main__", alter_sys=True)
    except RefusedCheckpoint as e:
        print(f"{REFUSED_PREFIX}{e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
