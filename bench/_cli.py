"""How the bench scripts end: an error caused by their input (a missing bundle or file,
unreadable audio, a bad value) is one line on stderr and exit status 2, as `echox` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable

from echox.errors import EchoXError


def run(main: Callable[[], int]) -> int:
    """`sys.exit(run(main))`: main's status, or 2 with one line for an input error."""
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
