"""Helpers of the file-reading tests: a read that must finish, never hang the session."""
import os
import threading

import pytest


def within(seconds, fn, fifo=None):
    """``fn()`` run in a thread that must finish within ``seconds``; a read blocked on
    ``fifo`` is released afterwards, so that a failing test cannot hang the session."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        if fifo is not None:
            try:  # a writer that closes at once gives the blocked reader its EOF
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
            t.join(5)
        pytest.fail(f"the read did not finish within {seconds} s (it waits on {fifo})")
    if "error" in box:
        raise box["error"]
    return box.get("value")
