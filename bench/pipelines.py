"""Pipeline overhead and log streaming: a cached-environment pipeline run through conveyor's
executor versus running `python main.py` directly, in the same run.

- overhead: p50 wall time of R runs of a pipeline whose main.py prints one line, each through
  conveyor (enqueue, claim, environment lookup, subprocess in its own session with params on
  stdin, stdout streamed into run_logs, CPU/RSS sampling, final state) minus the p50 of R runs
  of the same main.py started directly with subprocess. Target: <= 150 ms added at p50.
- streaming: one pipeline printing N lines (default 100,000; the issue's 500,000 with
  --lines); lines/s = N / (run started_at -> finished_at), every line stored in PostgreSQL by
  then. Target >= 50,000 lines/s.

The executor runs in this process with a real LogWriter and RunMonitor (the worker's code
path without the broker hop, which bench/throughput.py measures separately).
Run: `python -m bench.pipelines [--runs 30] [--lines 500000]`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import close_executor, fresh_database, in_process_executor
from domain.db.engine import create_db_engine
from domain.db.unit_of_work import UnitOfWork
from domain.pipelines.discovery import PipelineCatalog
from domain.runs import control, enqueue
from domain.runs.requests import build_request
from domain.settings import load_settings
from domain.tasks.registry import Registry
from worker import capture
from worker.logwriter import LogWriter
from worker.pipelines import build_pipeline_runner

ONE_LINE = "print('done')\n"
CHATTY = "import sys\nw = sys.stdout.write\nfor i in range({n}):\n    w(f'line {{i}}\\n')\n"


def write_pipelines(root: Path, lines: int) -> None:
    for name, code in (("one_line", ONE_LINE), ("chatty", CHATTY.format(n=lines))):
        (root / name).mkdir()
        (root / name / "main.py").write_text(code)
        (root / name / "pipeline.json").write_text('{"timeout": 600}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=30, help="runs per measurement")
    parser.add_argument("--lines", type=int, default=100_000, help="lines the chatty one prints")
    args = parser.parse_args()

    url = fresh_database("conveyor_bench_pipelines")
    home = Path(tempfile.mkdtemp(prefix="conveyor-bench-"))
    (home / "pipelines").mkdir()
    write_pipelines(home / "pipelines", args.lines)
    settings = load_settings(database_url=url, home=home, pipelines_dir=home / "pipelines")
    engine = create_db_engine(url, pool_size=3, pre_ping=False)
    writer = LogWriter(engine)
    writer.start()
    capture.install()
    runner = build_pipeline_runner(settings, engine, writer)
    executor = in_process_executor(engine, writer, Registry(), pipelines=runner)
    catalog = PipelineCatalog(runner.directory, engine)

    def through_conveyor(name: str) -> float:
        started = time.perf_counter()
        run_id = enqueue.enqueue(
            UnitOfWork(engine), build_request(name=name, kind="pipeline"), catalog=catalog
        ).run.id
        outcome = executor.execute(run_id)
        if outcome.status != "succeeded":
            raise SystemExit(f"{name} ended {outcome.status}")
        return time.perf_counter() - started

    main_py = home / "pipelines" / "one_line" / "main.py"

    def directly() -> float:
        started = time.perf_counter()
        subprocess.run([sys.executable, str(main_py)], check=True, capture_output=True)
        return time.perf_counter() - started

    through_conveyor("one_line")  # the environment lookup is cached from here on
    direct = [directly() for _ in range(args.runs)]
    conveyed = [through_conveyor("one_line") for _ in range(args.runs)]
    p50_direct, p50_conveyor = statistics.median(direct), statistics.median(conveyed)
    added_ms = (p50_conveyor - p50_direct) * 1000

    run_id = enqueue.enqueue(
        UnitOfWork(engine), build_request(name="chatty", kind="pipeline"), catalog=catalog
    ).run.id
    executor.execute(run_id)
    run = control.get_run(UnitOfWork(engine), run_id)
    assert run.status == "succeeded" and run.duration_s, run.status
    rate = args.lines / run.duration_s

    print(f"\npipelines: {args.runs} runs each, p50, this machine\n")
    print(f"{'what':<48} {'p50 ms':>8}")
    print(f"{'python main.py, directly (baseline)':<48} {p50_direct * 1000:>8.1f}")
    print(f"{'conveyor: enqueue, claim, run, stream, record':<48} {p50_conveyor * 1000:>8.1f}")
    print(
        f"\nadded per run at p50: {added_ms:.1f} ms (target <= 150 ms): "
        f"{'met' if added_ms <= 150 else 'MISSED'}"
    )
    print(
        f"streaming: {args.lines:,} lines in {run.duration_s:.2f} s = {rate:,.0f} lines/s "
        f"stored (target >= 50,000): {'met' if rate >= 50_000 else 'MISSED'}"
    )
    close_executor(executor)
    writer.close()
    engine.dispose()


if __name__ == "__main__":
    main()
