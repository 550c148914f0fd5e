"""The one error type a user sees: a single line, exit code 2."""

import functools
import sys


class DoolyError(Exception):
    """Bad input or an impossible request: printed as one line, exit code 2, never a traceback."""

    exit_code = 2


def command(main):
    """A command's `main(argv)`: a DoolyError it raises becomes one `error:` line and its exit code."""

    @functools.wraps(main)
    def run(argv=None):
        try:
            return main(argv)
        except DoolyError as e:
            print(f"error: {e}", file=sys.stderr)
            return e.exit_code

    return run
