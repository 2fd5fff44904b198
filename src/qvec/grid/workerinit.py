"""Start-up of local worker processes, kept free of heavy imports so that it runs within a fraction of a second.

A worker must die with the driver, or a killed run would leave an orphan that keeps writing artifacts (and holding
its memory, docs/grid.md "Crash safety") behind it. Linux's ``PR_SET_PDEATHSIG`` does that, but only from the
moment it is set: importing torch first would leave a window of seconds in which a kill of the driver orphans the
worker. This module imports nothing from qvec or torch, and checks after setting the signal that the driver is
still its parent.
"""

from __future__ import annotations

import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: SIGKILL this process when ``parent_pid`` dies; exit now if it already has."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL))
    except (OSError, AttributeError):  # not Linux: the worker notices the closed pipe and exits instead
        return
    if os.getppid() != parent_pid:  # the driver died before the signal was armed
        os._exit(1)
