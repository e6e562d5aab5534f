"""Runs a notebook pipeline's main.ipynb cell by cell, inside the pipeline's own environment.

conveyor starts this file with the pipeline environment's python (worker/pipelines/notebooks.py),
so it imports only the standard library and what conveyor installs there: nbclient, nbformat and
their jupyter_client; never conveyor. What it prints is what the worker records:

- each code cell is a step (`::conveyor::` step events named `cell N`, N counting code cells
  only, as pipeline.json's `cells` does);
- a cell's outputs as they arrive, each line as `[cell N] text`: stream output on its own
  stream, results and displays (their text/plain) on stdout, tracebacks on stderr;
- a failed attempt that will be retried as a warning event; the cell then runs again in the
  same kernel after its delay (`cells[N]`, overridden by the cell's metadata.fastflow).

The executed notebook, outputs included, is written to --output after every cell. A cell that
fails for good writes its report (cell, attempts, traceback) to --report and exits 1; a
notebook or `cells` that cannot be used exits 2 the same way.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Any

EVENT = os.environ.get("CONVEYOR_EVENT_PREFIX", "::conveyor::")
ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
MAX_REPORT = 16_000
FAILED, UNUSABLE = 1, 2


class Unusable(Exception):
    """The notebook or its retry settings cannot be used as they are."""


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    # This file's folder holds conveyor's modules (events.py, process.py, ...): they must not
    # shadow a package nbclient imports.
    here = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [p for p in sys.path if not p or os.path.realpath(p) != here]
    try:
        return _run(args)
    except Unusable as exc:
        _report(args.report, f"{args.notebook}: {exc}")
        print(f"{args.notebook}: {exc}", file=sys.stderr, flush=True)
        return UNUSABLE


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("notebook")
    parser.add_argument("--cells", default="[]", help="pipeline.json's `cells`, as JSON")
    parser.add_argument("--output", required=True, help="where the executed notebook goes")
    parser.add_argument("--report", required=True, help="where a failure's report goes")
    return parser.parse_args(argv)


def _run(args: argparse.Namespace) -> int:
    try:
        import nbformat
        from jupyter_client.kernelspec import KernelSpecManager
        from nbclient import NotebookClient
        from nbclient.exceptions import CellExecutionError, DeadKernelError
    except ImportError as exc:
        raise Unusable(f"the notebook client is missing from the environment ({exc})") from None
    try:
        nb = nbformat.read(args.notebook, as_version=4)
    except Exception as exc:  # nbformat raises a different class per problem
        raise Unusable(f"cannot be read as a notebook ({type(exc).__name__}: {exc})") from None
    plans = _plans(nb, json.loads(args.cells))
    printer = Printer()
    sockets = tempfile.mkdtemp(prefix="conveyor-kernel-")

    class StreamingClient(NotebookClient):  # type: ignore[misc]
        def create_kernel_manager(self) -> Any:
            # The python3 kernel of *this* interpreter (the pipeline's environment), whatever
            # kernelspecs the machine has or the notebook's metadata names; IPC sockets in a
            # private folder, so no TCP port is open to other local users.
            self.km = self.kernel_manager_class(
                kernel_name="python3",
                kernel_spec_manager=KernelSpecManager(kernel_dirs=[]),
                transport="ipc",
                ip=os.path.join(sockets, "kernel"),
            )
            return self.km

        def output(self, outs: Any, msg: Any, display_id: Any, cell_index: int) -> Any:
            out = super().output(outs, msg, display_id, cell_index)
            if out is not None:
                printer.show(out)
            return out

    folder = os.path.dirname(os.path.abspath(args.notebook))
    client = StreamingClient(
        nb, timeout=None, kernel_name="python3", resources={"metadata": {"path": folder}}
    )
    client.reset_execution_trackers()
    save = functools.partial(_save, nbformat, nb, args.output)
    try:
        with client.setup_kernel():
            info = client.wait_for_reply(client.kc.kernel_info()) or {}
            if "language_info" in info.get("content", {}):
                nb.metadata["language_info"] = info["content"]["language_info"]
            for index, code, retries, delay in plans:
                _event(event="step", name=f"cell {code}", type="notebook_cell")
                try:
                    _execute(client, printer, nb.cells[index], index, code, retries, delay)
                except CellExecutionError as exc:
                    summary = f"{exc.ename}: {exc.evalue}"
                    where = f"{args.notebook}: code cell {code} (cell {index} of the notebook)"
                    _report(
                        args.report,
                        f"{where} failed after {retries + 1} attempt(s): {summary}\n"
                        + _traceback(nb.cells[index], exc),
                    )
                    _event(event="step_end", status="failed", detail=summary[:500])
                    return FAILED
                except DeadKernelError as exc:
                    where = f"code cell {code} (cell {index} of the notebook)"
                    _report(args.report, f"{args.notebook}: the kernel died in {where}: {exc}")
                    _event(event="step_end", status="failed", detail="the kernel died")
                    return FAILED
                finally:
                    save()
                _event(event="step_end", status="completed")
    finally:
        shutil.rmtree(sockets, ignore_errors=True)
    return 0


def _execute(
    client: Any, printer: Printer, cell: Any, index: int, code: int, retries: int, delay: float
) -> None:
    """Run one cell, again in the same kernel after `delay` while retries are left (the last
    failure is raised)."""
    from nbclient.exceptions import CellExecutionError

    for attempt in range(1, retries + 2):
        printer.start(code)
        try:
            client.execute_cell(cell, index)
            return
        except CellExecutionError as exc:
            if attempt > retries:
                raise
            _event(
                event="log",
                level="warning",
                message=f"cell {code}: attempt {attempt} of {retries + 1} failed "
                f"({exc.ename}: {exc.evalue}); retrying in {delay:g}s",
                fields={"cell": code, "attempt": attempt, "retry_in_s": delay},
            )
            time.sleep(delay)
        finally:
            printer.flush()
    raise AssertionError("unreachable: the last attempt returns or raises")


def _plans(nb: Any, cells: Any) -> list[tuple[int, int, int, float]]:
    """(notebook index, code cell number, retries, delay) for every code cell to run."""
    if not isinstance(cells, list):
        raise Unusable("`cells` must be a list")
    plans = []
    code = -1
    for index, cell in enumerate(nb.cells):
        if cell.get("cell_type") != "code":
            continue
        code += 1
        if not str(cell.get("source", "")).strip():
            continue  # nothing to run (and nbclient would skip it)
        base = cells[code] if code < len(cells) and isinstance(cells[code], dict) else {}
        retries, delay = base.get("retries", 0), base.get("delay_seconds", 1.0)
        own = cell.get("metadata", {}).get("fastflow")
        where = f"code cell {code} (cell {index} of the notebook): metadata.fastflow"
        if own is not None and not isinstance(own, dict):
            raise Unusable(f"{where}: expected an object with retries and delay_seconds")
        if own:
            retries = own.get("retries", retries)
            delay = own.get("delay_seconds", delay)
        if isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 99:
            raise Unusable(
                f"{where}.retries: expected a whole number from 0 to 99; got {retries!r}"
            )
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            raise Unusable(f"{where}.delay_seconds: expected seconds >= 0; got {delay!r}")
        plans.append((index, code, retries, float(delay)))
    return plans


class Printer:
    """A cell's outputs as log lines, `[cell N] ` first; partial lines wait for their end."""

    def __init__(self) -> None:
        self.prefix = ""
        self.partial = {"stdout": "", "stderr": ""}

    def start(self, code: int) -> None:
        self.flush()
        self.prefix = f"[cell {code}] "

    def show(self, out: Any) -> None:
        kind = out.get("output_type")
        if kind == "stream":
            self.write("stderr" if out.get("name") == "stderr" else "stdout", out.get("text", ""))
        elif kind in {"execute_result", "display_data"}:
            data = out.get("data", {})
            text = data.get("text/plain")
            self.lines("stdout", text if text is not None else f"<{', '.join(sorted(data))}>")
        elif kind == "error":
            tb = out.get("traceback") or [f"{out.get('ename')}: {out.get('evalue')}"]
            self.lines("stderr", "\n".join(tb))

    def write(self, stream: str, text: str) -> None:
        pending = self.partial[stream] + text
        *complete, self.partial[stream] = pending.split("\n")
        for line in complete:
            self._emit(stream, line)

    def lines(self, stream: str, text: str) -> None:
        self._flush(stream)
        for line in str(text).split("\n"):
            self._emit(stream, line)

    def flush(self) -> None:
        for stream in self.partial:
            self._flush(stream)

    def _flush(self, stream: str) -> None:
        if self.partial[stream]:
            self._emit(stream, self.partial[stream])
            self.partial[stream] = ""

    def _emit(self, stream: str, line: str) -> None:
        line = ANSI.sub("", line).rsplit("\r", 1)[-1]  # a progress bar: its last state
        print(self.prefix + line, file=sys.stderr if stream == "stderr" else sys.stdout, flush=True)


def _traceback(cell: Any, exc: Any) -> str:
    for out in reversed(cell.get("outputs", [])):
        if out.get("output_type") == "error" and out.get("traceback"):
            return ANSI.sub("", "\n".join(out["traceback"]))
    return ANSI.sub("", str(exc))


def _event(**payload: Any) -> None:
    print(EVENT + json.dumps(payload), flush=True)


def _save(nbformat: Any, nb: Any, path: str) -> None:
    """Written whole and renamed: a run stopped mid-write leaves the previous cell's copy."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = path + ".partial"
    nbformat.write(nb, partial)
    os.replace(partial, path)


def _report(path: str, text: str) -> None:
    if len(text) > MAX_REPORT:
        text = text[:2000] + "\n…\n" + text[-(MAX_REPORT - 2000) :]
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


if __name__ == "__main__":
    sys.exit(main())
