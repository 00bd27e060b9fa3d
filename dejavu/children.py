"""Processes that end with the one that started them (`dejavu up`'s children)."""

from __future__ import annotations

import os
import sys
import threading

# A child of `dejavu up` ends with it: SIGKILLed or OOM-killed, it would leave the services running
# with nobody to restart them, holding its port and their KV pools. Linux's parent-death signal (a
# SIGTERM: a service stops as on Ctrl-C) is set by a trampoline that then execs the child (a
# preexec_fn is unsafe beside our log pumps' threads); it exits at once if the parent is already
# gone. The signal follows the thread that started the child: `dejavu up` starts and restarts
# them all from its main thread.
_TRAMPOLINE = ("import ctypes,os,sys;ctypes.CDLL(None).prctl(1,15);"  # PR_SET_PDEATHSIG, SIGTERM
               "os.getppid()==int(sys.argv[1]) or os._exit(1);os.execv(sys.argv[2],sys.argv[2:])")


def ending_with_us(argv: list[str]) -> list[str]:
    """`argv` (its program an absolute path) so that the process ends when this one does (Linux).
    Only from the main thread: the child would end with any other thread that started it."""
    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("a child that ends with us is started from the main thread: it would end with this one")
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-S", "-c", _TRAMPOLINE, str(os.getpid()), *argv]


def child_argv(argv: list[str], end_with_us: bool | None) -> list[str]:
    """`argv` ending with us (True), or not (False); None: where this is the main thread, the only
    one where it is safe, so that a harness killed (a test run, a benchmark) leaves nothing running."""
    if end_with_us is None:
        end_with_us = threading.current_thread() is threading.main_thread()
    return ending_with_us(argv) if end_with_us else argv
