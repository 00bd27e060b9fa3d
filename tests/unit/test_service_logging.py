"""How a service logs (common.service.configure_logging's filters)."""

from __future__ import annotations


def test_a_request_cut_by_a_stop_is_one_info_line_and_any_other_error_keeps_its_traceback():
    """uvicorn logs each request still open when its stop's grace runs out as an ERROR with a
    traceback over a CancelledError (a probe: ~60 lines an open stream at every routine restart)."""
    import asyncio
    import logging
    import sys

    from common.service import _StopCutFilter

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            return logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1, "Exception in ASGI application",
                                     (), sys.exc_info())

    cut = record(asyncio.CancelledError("Task cancelled, timeout graceful shutdown exceeded"))
    assert _StopCutFilter().filter(cut) and cut.levelno == logging.INFO and cut.exc_info is None
    assert cut.getMessage() == "a request cut by the stop: Task cancelled, timeout graceful shutdown exceeded"
    bug = record(RuntimeError("a bug"))
    assert _StopCutFilter().filter(bug) and bug.levelno == logging.ERROR and bug.exc_info is not None
    count = logging.LogRecord("uvicorn.error", logging.ERROR, __file__, 1,
                              "Cancel %s running task(s), timeout graceful shutdown exceeded", (2,), None)
    assert _StopCutFilter().filter(count) and count.levelno == logging.INFO and "Cancel 2 running" in count.getMessage()
