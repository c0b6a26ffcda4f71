"""How the bench scripts end: an error caused by their input (a missing bundle or file,
unreadable audio, a bad value) is one line on stderr and exit status 2, as `echox` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from echox.errors import EchoXError


def run(main: Callable[[], int]) -> int:
    """main's status, or 2 with one line for an input error. A script ends with
    `import _cli; sys.exit(_cli.run(main))` under `if __name__ == "__main__":` (imported
    there, since tests load the scripts without bench/ on sys.path; and as a module, since
    `from _cli import run` would replace a script's own `run`)."""
    name = Path(sys.argv[0]).stem
    try:
        return main()
    except SystemExit as e:  # the scripts' own `raise SystemExit("message")`
        if isinstance(e.code, str):
            print(f"{name}: error: {e.code}", file=sys.stderr)
            return 2
        raise
    except (EchoXError, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        print(f"{name}: error: {e}".splitlines()[0], file=sys.stderr)
        return 2
