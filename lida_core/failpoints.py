"""Named points where a test can kill the process (`LIDA_FAIL_AT=name`), to check crash recovery at each step.

`reached(name)` does nothing unless the environment names that point; then the process dies
by SIGKILL on the spot, as `kill -9` would, with no cleanup and no exception handlers.
"""

from __future__ import annotations

import os
import signal


def reached(name: str) -> None:
    if os.environ.get("LIDA_FAIL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
