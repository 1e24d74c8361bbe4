"""Entry-point plumbing: a user's mistake is one clear line and exit status 2, not a traceback."""
from __future__ import annotations

import os
import sys

from util.errors import UserError


def run(main, argv=None, prog: str | None = None):
    """Call ``main(argv)``; report a :class:`~util.errors.UserError` as one line on stderr,
    ``<prog>: error: <message>``, and exit with status 2. Any other exception is a bug and
    keeps its traceback."""
    try:
        return main(argv)
    except UserError as e:
        print(f"{prog or os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr)
        sys.exit(2)
