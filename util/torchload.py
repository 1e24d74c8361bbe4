"""Reading tensor files (checkpoints, backbone weights) with ``torch.load(weights_only=True)``,
and what a failure means, in one line.

torch's own messages run to many lines and, for a file holding objects beyond tensors,
advise re-running with ``weights_only=False`` — which would run whatever the file carries.
:func:`load_tensors` raises the caller's error with one line naming the file instead.
"""
from __future__ import annotations

import pickle
import re

import torch

from util.errors import UserError

_REFUSED = re.compile(r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|GLOBAL \S+ was not an allowed global)",
                      re.IGNORECASE)


def classify_load_error(error: BaseException) -> tuple[str, str]:
    """``("refused", "unsupported GLOBAL posix.system")`` when the file holds objects the
    weights-only unpickler does not read; else ``("corrupt", "<type>: <first line>")``."""
    text = str(error)
    if isinstance(error, pickle.UnpicklingError):
        refused = _REFUSED.search(text)
        if refused is not None:
            return "refused", refused.group(1).rstrip(".,;")
        return "corrupt", "UnpicklingError"
    first = text.strip().splitlines()[0] if text.strip() else ""
    return "corrupt", f"{type(error).__name__}: {first}" if first else type(error).__name__


def load_tensors(path: str, error: type[UserError], what: str, fix_refused: str, fix_corrupt: str,
                 note=lambda detail: ""):
    """``torch.load(path, map_location="cpu", weights_only=True)``; a failure is ``error``
    with one line: "<what> '<path>' is refused: ... (<detail>)<note(detail)>. <fix_refused>"
    or "<what> '<path>' is unreadable or corrupt, truncated perhaps (<detail>); <fix_corrupt>"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - every failure is classified: refused or corrupt
        kind, detail = classify_load_error(e)
        if kind == "refused":
            raise error(f"{what} '{path}' is refused: it holds objects other than tensors and plain values "
                        f"({detail}{note(detail)}). A crafted file could run code when loaded, so nothing beyond "
                        f"tensors is read; {fix_refused}") from None
        raise error(f"{what} '{path}' is unreadable or corrupt, truncated perhaps ({detail}); {fix_corrupt}") from None
