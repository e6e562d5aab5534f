"""Sockets left to the garbage collector: a full collection after each test file, so the
warning names the file that left one, instead of surfacing as a failure in whichever later
test happens to run when the collector does (it did in tests/unit/test_layering.py, twice,
for the publisher's per-thread Redis lines; worker/publisher.py now closes them). Reported,
not failed: each one shows in pytest's warnings summary under the last test of its file."""

from __future__ import annotations

import gc
import warnings


class SocketLeftToTheCollector(UserWarning):
    """An unclosed socket that only the garbage collector reclaimed (it sat in a cycle)."""


def collect_and_report() -> None:
    """A full collection now, with the sockets' ResourceWarnings re-issued as
    `SocketLeftToTheCollector` (pyproject shows them without failing the test); any other
    ResourceWarning is re-issued as it was."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        gc.collect()
    for left in caught:
        if not issubclass(left.category, ResourceWarning):
            continue
        if "socket" in str(left.message):
            warnings.warn(SocketLeftToTheCollector(str(left.message)), stacklevel=2)
        else:
            warnings.warn_explicit(left.message, left.category, left.filename, left.lineno)
