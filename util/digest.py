"""A content checksum of nested containers of tensors and plain values (checkpoints).

The digest covers every tensor's dtype, shape and bytes (in logical order, whatever the
memory layout) and every other value's type and ``repr``, walking dicts in a fixed key
order, so the object a checkpoint was written from and the object read back from it give
the same digest, and a flipped byte or a cut-off tensor does not.
"""
from __future__ import annotations

import hashlib
from typing import Any

import torch


def content_digest(obj: Any) -> str:
    h = hashlib.blake2b(digest_size=16)
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)};".encode())
        for key in sorted(obj, key=repr):
            _feed(h, key)
            _feed(h, obj[key])
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)};".encode())
        for item in obj:
            _feed(h, item)
    else:
        h.update(f"{type(obj).__name__}:{obj!r};".encode())
