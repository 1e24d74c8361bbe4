"""Entry-point plumbing: a user's mistake is one clear line and exit status 2, not a traceback."""
from __future__ import annotations

import os
import sys

from util.errors import UserError
from util.interrupt import restore_sigint


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
