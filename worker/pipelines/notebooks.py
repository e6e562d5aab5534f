"""How the worker starts a pipeline's code: `python main.py`, or for a notebook pipeline
`python notebook_runner.py main.ipynb …` with the pipeline environment's interpreter.

The kernel and the notebook client belong to the pipeline's environment, never to conveyor's:
NOTEBOOK_PACKAGES are added to what the environment builder installs (and so to its hash), and
the runner script imports nothing of conveyor. A failed cell's report (which cell, after how
many attempts, its traceback) comes back in a file, to become the run's error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from domain.pipelines.config import PipelineConfig
from domain.pipelines.discovery import DiscoveredPipeline

#: What notebook_runner.py needs in the pipeline's environment (a kernel and the client).
NOTEBOOK_PACKAGES = ("ipykernel>=6", "nbclient>=0.7", "nbformat>=5.7")
RUNNER = Path(__file__).with_name("notebook_runner.py")
#: The executed notebook, outputs included, among the run's artifacts.
EXECUTED = "main.ipynb"
REPORT = "notebook-failure.txt"


def env_packages(pipeline: DiscoveredPipeline) -> tuple[str, ...]:
    """Packages conveyor adds to this pipeline's environment."""
    return NOTEBOOK_PACKAGES if pipeline.is_notebook else ()


@dataclass(frozen=True)
class Launch:
    """The command for one run, and how its errors name the code that ran."""

    argv: list[str]
    entry: str  # "main.py" or "main.ipynb"
    report: Path | None = None

    def failure(self) -> str | None:
        """The notebook runner's report of why it failed, when it left one."""
        if self.report is None:
            return None
        try:
            text = self.report.read_text("utf-8", "replace").strip()
        except OSError:
            return None
        return text or None


def launch(
    pipeline: DiscoveredPipeline,
    config: PipelineConfig,
    python: Path,
    *,
    artifacts: Path,
    scratch: Path,
) -> Launch:
    """The command that runs `pipeline`; `scratch` is a private folder of this run's."""
    entry = pipeline.entrypoint
    if not pipeline.is_notebook:
        return Launch([str(python), str(entry)], entry.name)
    report = scratch / REPORT
    cells = json.dumps([cell.model_dump() for cell in config.cells])
    argv = [str(python), str(RUNNER), entry.name, "--cells", cells]
    argv += ["--output", str(artifacts / EXECUTED), "--report", str(report)]
    return Launch(argv, entry.name, report)
