"""Entry-point plumbing: a user's mistake is one clear line and exit status 2, not a traceback."""
from __future__ import annotations

import os
import sys

from util.errors import UserError, user_message
from util.interrupt import restore_sigint


def run(main, argv=None, prog: str | None = None):
    """Call ``main(argv)``; report a :class:`~util.errors.UserError` as one line on stderr,
    ``<prog>: error: <message>``, and exit with status 2. A Ctrl-C that is not handled as a
    stop (before training starts, or a second one) is one line and exit status 130. Any
    other exception is a bug and keeps its traceback."""
    prog = prog or os.path.basename(sys.argv[0])
    restore_sigint()
    try:
        return main(argv)
    except UserError as e:
        print(f"{prog}: error: {user_message(e)}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted (Ctrl-C); checkpoints are written whole or not at all, so the last one "
              f"saved is intact", file=sys.stderr)
        sys.exit(130)
