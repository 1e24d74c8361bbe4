"""The one error model: a user's mistake is a :class:`UserError`.

Every script runs its ``main`` through ``util.cli.run``, which reports a ``UserError`` as
one line on stderr (the message names the file or key and says how to fix it) and exits
with status 2; anything else is a bug and keeps its traceback.

Each subclass also derives from the built-in exception it replaced (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so code that caught those keeps working.
"""
from __future__ import annotations

import os


class UserError(Exception):
    """Bad input from the user (config, data, checkpoint, weights, device, predictor input)."""


class ConfigError(UserError, ValueError):
    """A configuration file or override is invalid."""


class DataError(UserError, ValueError):
    """A list file, image or label cannot be used as given (missing, unreadable, mislabelled,
    too few images for the episodes asked for)."""


class DataFileMissing(DataError, FileNotFoundError):
    """A list file or a file it names does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file is missing, unreadable, or does not fit the configured model."""


class BackboneWeightsError(UserError, RuntimeError):
    """A backbone weight file is missing, unreadable or does not fit the configured backbone."""


class DeviceError(UserError, ValueError):
    """The device (or precision) asked for cannot be used here."""


class PredictInputError(UserError, ValueError):
    """An image or mask given to the predictor cannot be used."""


def user_message(error: UserError) -> str:
    """The message of ``error``; for one a DataLoader worker raised, the worker's own message.
    torch re-raises it in the main process as the same type whose message is "Caught <type> in
    DataLoader worker process N." plus the worker's whole traceback, ending with the line
    "<module>.<type>: <message>"."""
    text = str(error)
    if not (text.startswith("Caught ") and "\nOriginal Traceback" in text):
        return text
    kind = type(error)
    for name in (f"{kind.__module__}.{kind.__qualname__}: ", f"{kind.__qualname__}: "):
        at = text.rfind("\n" + name)
        if at >= 0:
            return text[at + 1 + len(name):].strip()
    return text.splitlines()[-1].strip()


# ---- one wording per fault: every place that meets the fault builds its message here --------------

def missing_file(kind: str, path: str, fix: str) -> str:
    """``kind`` (image, mask, label, class list, ...) at ``path`` does not exist: named by its
    absolute path, with ``fix``."""
    return f"{kind} '{os.path.abspath(path)}' does not exist; {fix}"


def unreadable_image(kind: str, path: str, detail: str = "") -> str:
    """An image, mask, label or frame file that exists but does not decode. ``detail``: what
    the decoder said, when it said something."""
    formats = "JPEG or PNG" if kind in ("image", "frame") else "a PNG"
    why = f" ({detail})" if detail else ""
    return (f"cannot read {kind} '{os.path.abspath(path)}'{why}: the file is empty, corrupt or not an image "
            f"format OpenCV and PIL read; re-export it as {formats}")


def missing_or_unreadable(kind: str, path: str, detail: str = "") -> str:
    """A file that a reader could not decode: :func:`missing_file` when it is not there, else
    :func:`unreadable_image`."""
    if not os.path.isfile(path):
        return missing_file(kind, path, "check the path, the list that names it or data_root")
    return unreadable_image(kind, path, detail)


def too_few_for_shots(shot: int, unit: str = "images") -> str:
    """The start of the message for a class with fewer than K + 1 images (videos) for K-shot
    episodes: a query and K supports."""
    return (f"{shot}-shot episodes need at least {shot + 1} {unit} per class (a query and {shot} "
            f"support{'' if shot == 1 else 's'})")
