"""Entry-point plumbing: a user's mistake is one clear line and exit status 2, not a traceback."""
from __future__ import annotations

import sys

from util.checkpoint import CheckpointError
from util.config import ConfigError
from util.video_index import VideoDataError


def user_errors() -> tuple[type, ...]:
    """Exceptions that mean bad input (config, files, checkpoints, weights) rather than a bug."""
    from model import BackboneWeightsError
    from util.distributed import DeviceError
    return (ConfigError, CheckpointError, BackboneWeightsError, DeviceError, VideoDataError, FileNotFoundError)


def run(main, argv=None):
    """Call ``main(argv)``; report a user error on one line and exit 2."""
    try:
        return main(argv)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
