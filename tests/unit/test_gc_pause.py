"""gc_paused: overlapping holders (threads) resume the collector only when the last leaves."""

from __future__ import annotations

import gc
import threading
import weakref

from domain.gc_pause import freeze_startup_heap, gc_paused


def test_the_last_holder_out_resumes_the_collector() -> None:
    assert gc.isenabled()
    first_in = threading.Event()
    second_in = threading.Event()
    first_out = threading.Event()
    seen: dict[str, bool] = {}

    def second() -> None:
        first_in.wait()
        with gc_paused():
            second_in.set()
            first_out.wait()
            seen["after the first left"] = gc.isenabled()

    thread = threading.Thread(target=second)
    thread.start()
    with gc_paused():
        seen["inside"] = gc.isenabled()
        first_in.set()
        second_in.wait()
    first_out.set()
    thread.join()
    assert seen == {"inside": False, "after the first left": False}
    assert gc.isenabled()


def test_an_exception_still_resumes_it() -> None:
    try:
        with gc_paused():
            raise KeyError("x")
    except KeyError:
        pass
    assert gc.isenabled()


def test_freezing_the_startup_heap_collects_garbage_first_and_freezes_the_rest() -> None:
    class Node:
        other: object = None

    cycle = Node()
    cycle.other = cycle  # garbage once dropped: only the collector frees a cycle
    gone = weakref.ref(cycle)
    del cycle
    before = gc.get_freeze_count()
    try:
        freeze_startup_heap()
        assert gone() is None  # collected, not frozen
        assert gc.get_freeze_count() > before
    finally:
        gc.unfreeze()
