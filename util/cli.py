"""Entry-point plumbing: a user's mistake is one clear line and exit status 2, not a traceback."""
from __future__ import annotations

import sys

from util.errors import UserError


def run(main, argv=None):
    """Call ``main(argv)``; report a :class:`~util.errors.UserError` on one line and exit 2."""
    try:
        return main(argv)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
