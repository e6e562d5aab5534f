"""Pipeline environments: one uv venv per (requirements, interpreter) hash, built once.

Layout under the cache dir: `<hash>/` is the venv, `<hash>/.conveyor-ready` is written last
(a folder without it is a build that died and is redone), `<hash>.lock` is the file lock that
makes concurrent first runs, in any number of processes, wait for one build, and `uv-cache/`
is uv's download cache shared by all builds. A build is bounded by a timeout and by the run's
stop request, so a resolver that hangs can never hang a worker.

A `requirements.txt.lock` is installed exactly (`uv pip sync`), a `requirements.txt` resolved
(`uv pip install -r`). `packages` are what conveyor itself needs in the environment (a notebook
pipeline's kernel and notebook client): resolved together with requirements.txt, installed
after a lock, and part of the hash. `python_version` is found by uv among the managed and
system interpreters (`uv python find --system`); none is downloaded unless UV_PYTHON_DOWNLOADS
says so.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from domain.clock import utc_now
from domain.errors import ConveyorError
from worker.pipelines.uvconfig import uv_binary, uv_environment

READY = ".conveyor-ready"
MAX_ERROR_LINES = 40
LogFn = Callable[[str, str], None]  # (message, level)


class PipelineEnvError(ConveyorError):
    """The pipeline's environment could not be prepared."""


class InterpreterNotFound(PipelineEnvError):
    """The Python version the pipeline asks for is not installed on this worker."""

    self_explanatory = True


@dataclass(frozen=True)
class Interpreter:
    path: Path
    version: str  # "3.11.2"


@dataclass(frozen=True)
class EnvInfo:
    """Where a pipeline runs: `python` to start it with, and how the environment came to be."""

    python: Path
    env_hash: str | None  # None: the bare interpreter
    built: bool  # True: this call built it (False: reused, or no requirements)
    setup_s: float
    location: Path | None


class EnvManager:
    """Builds and finds pipeline environments under `cache_dir` with uv."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        timeout_s: float = 600.0,
        uv: str | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> None:
        self.cache_dir = Path(cache_dir).absolute()
        self.timeout_s = timeout_s
        self._uv = uv
        self._extra_env = extra_env
        self._interpreters: dict[str, Interpreter] = {}
        self._uv_version: str | None = None

    # -- interpreters ------------------------------------------------------------------------
    def interpreter(self, python_version: str | None) -> Interpreter:
        """The interpreter for `python_version` ("3.11", "3.11.2"; None: this worker's)."""
        key = python_version or ""
        if key not in self._interpreters:
            self._interpreters[key] = self._find_interpreter(python_version)
        return self._interpreters[key]

    def _find_interpreter(self, wanted: str | None) -> Interpreter:
        own = Interpreter(_base_executable(), ".".join(map(str, sys.version_info[:3])))
        if wanted is None or _matches(own.version, wanted):
            return own
        found = self._uv_find(wanted)
        version = _probe_version(found) if found is not None else None
        if found is not None and version is not None and _matches(version, wanted):
            return Interpreter(found, version)
        have = ", ".join(self.installed_versions(also=own.version))
        raise InterpreterNotFound(
            f"python_version {wanted!r}: no such interpreter on this worker (it has Python "
            f"{have}); install it (e.g. `uv python install`) or change pipeline.json"
        )

    def _uv_find(self, wanted: str) -> Path | None:
        """uv's answer for `wanted`: a managed or a system interpreter, never a virtualenv's
        (--system) and never a download (UV_PYTHON_DOWNLOADS=never unless set otherwise)."""
        code, out = self._uv_query(["python", "find", "--system", wanted])
        lines = out.strip().splitlines()
        return Path(lines[-1]) if code == 0 and lines else None

    def installed_versions(self, *, also: str | None = None) -> list[str]:
        """The Python versions uv can see on this worker (managed and system), oldest first."""
        code, out = self._uv_query(
            ["python", "list", "--only-installed", "--output-format", "json"]
        )
        versions = {also} if also else set()
        # An older uv without JSON output: the worker's own version still shows.
        if code == 0:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                versions |= {str(item["version"]) for item in json.loads(out)}
        return sorted(versions, key=_version_key)

    def _uv_query(self, args: list[str]) -> tuple[int, str]:
        """A quick uv command's exit code and stdout. Run from / so that no project file
        (.python-version, pyproject.toml) of the worker's directory changes the answer."""
        env = {**os.environ, **self.uv_env(), "NO_COLOR": "1"}
        try:
            done = subprocess.run(
                [self.uv, *args], cwd="/", env=env, capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.SubprocessError):
            return 1, ""
        return done.returncode, done.stdout.decode("utf-8", "replace")

    # -- environments ------------------------------------------------------------------------
    @staticmethod
    def env_hash(
        requirements: bytes,
        interpreter: Interpreter,
        *,
        locked: bool = False,
        packages: Sequence[str] = (),
    ) -> str:
        """The environment's identity: interpreter version, platform, the requirements text,
        whether it is a lock (installed exactly with `uv pip sync`, not resolved), and the
        packages conveyor adds (none: the hash an environment without them always had)."""
        digest = hashlib.sha256()
        digest.update(f"python={interpreter.version};{sys.platform}\n".encode())
        if locked:
            digest.update(b"lock\n")
        if packages:
            digest.update(f"packages={' '.join(sorted(packages))}\n".encode())
        digest.update(requirements)
        return digest.hexdigest()

    def _identity(
        self, requirements: Path | None, interpreter: Interpreter, packages: Sequence[str]
    ) -> str:
        text = requirements.read_bytes() if requirements is not None else b""
        locked = requirements is not None and is_lock(requirements)
        return self.env_hash(text, interpreter, locked=locked, packages=packages)

    def ensure(
        self,
        requirements: Path | None,
        python_version: str | None,
        *,
        log: LogFn,
        should_stop: Callable[[], bool] = lambda: False,
        packages: Sequence[str] = (),
    ) -> EnvInfo:
        """The environment for these requirements and packages, building it if no process has
        yet (neither: the bare interpreter)."""
        interpreter = self.interpreter(python_version)
        if requirements is None and not packages:
            return EnvInfo(interpreter.path, None, False, 0.0, None)
        env_hash = self._identity(requirements, interpreter, packages)
        location = self.cache_dir / env_hash[:32]
        python = location / "bin" / "python"
        if (location / READY).is_file():
            return EnvInfo(python, env_hash, False, 0.0, location)
        started = time.monotonic()
        deadline = started + self.timeout_s
        with self._locked(location.with_suffix(".lock"), deadline, should_stop):
            if (location / READY).is_file():  # built by whoever held the lock before us
                waited = time.monotonic() - started
                log(f"environment {env_hash[:12]} was built by another run ({waited:.1f}s)", "info")
                return EnvInfo(python, env_hash, False, waited, location)
            source = _describe(requirements, packages)
            log(f"building environment {env_hash[:12]} from {source} with uv", "info")
            self._build(location, requirements, packages, interpreter, deadline, should_stop, log)
            setup_s = time.monotonic() - started
            info = {
                "hash": env_hash,
                "requirements": requirements.name if requirements is not None else None,
                "packages": list(packages),
                "python": interpreter.version,
                "uv": self.uv_version(),
                "built_at": utc_now().isoformat(),
                "setup_s": round(setup_s, 3),
            }
            (location / READY).write_text(json.dumps(info))
        log(f"environment {env_hash[:12]} ready in {setup_s:.1f}s", "info")
        return EnvInfo(python, env_hash, True, setup_s, location)

    def _build(
        self,
        location: Path,
        requirements: Path | None,
        packages: Sequence[str],
        interpreter: Interpreter,
        deadline: float,
        should_stop: Callable[[], bool],
        log: LogFn,
    ) -> None:
        if location.exists():
            shutil.rmtree(location)  # an unfinished build of a process that died
        installs: list[list[str]] = []
        if requirements is not None and is_lock(requirements):
            # A lock is installed exactly; what conveyor adds comes after (a no-op when the
            # lock already pins it).
            installs.append(["pip", "sync", str(requirements)])
            installs.append(["pip", "install", *packages] if packages else [])
        elif requirements is not None:
            installs.append(["pip", "install", "-r", str(requirements), *packages])
        else:
            installs.append(["pip", "install", *packages])
        target = ["--no-progress", "--python", str(location / "bin" / "python")]
        steps = [["venv", "--no-project", "--python", str(interpreter.path), str(location)]]
        steps += [[*args, *target] for args in installs if args]
        source = _describe(requirements, packages)
        for args in steps:
            code, output = self._run_uv(args, deadline, should_stop)
            if code != 0:
                shutil.rmtree(location, ignore_errors=True)
                lines = [ln for ln in output.splitlines() if ln.strip()][-MAX_ERROR_LINES:]
                for line in lines:
                    log(f"uv: {line}", "error")
                why = "\n".join(lines) or f"uv exited with code {code}"
                raise PipelineEnvError(f"uv could not build the environment from {source}:\n{why}")

    def _run_uv(
        self, args: list[str], deadline: float, should_stop: Callable[[], bool]
    ) -> tuple[int, str]:
        env = {**os.environ, **self.uv_env(), "NO_COLOR": "1"}
        proc = subprocess.Popen(
            [self.uv, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        while True:
            try:
                out, _ = proc.communicate(timeout=0.1)
                return proc.returncode, out.decode("utf-8", "replace")
            except subprocess.TimeoutExpired:
                pass
            if should_stop() or time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                out, _ = proc.communicate()
                if should_stop():
                    raise PipelineEnvError("the environment build was stopped with its run")
                raise PipelineEnvError(
                    f"uv did not finish within {self.timeout_s:.0f}s (pipeline_setup_timeout_s); "
                    "last output:\n" + "\n".join(out.decode("utf-8", "replace").splitlines()[-10:])
                )

    @contextlib.contextmanager
    def _locked(
        self, path: Path, deadline: float, should_stop: Callable[[], bool]
    ) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a+") as handle:
            while True:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                if should_stop():
                    raise PipelineEnvError("stopped while waiting for the environment build")
                if time.monotonic() > deadline:
                    raise PipelineEnvError(
                        f"another process has been building this environment for over "
                        f"{self.timeout_s:.0f}s (pipeline_setup_timeout_s)"
                    )
                time.sleep(0.05)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- uv ----------------------------------------------------------------------------------
    @property
    def uv(self) -> str:
        if self._uv is None:
            self._uv = uv_binary()
        return self._uv

    def uv_env(self) -> dict[str, str]:
        if self._extra_env is None:
            self._extra_env = uv_environment()
        return {"UV_CACHE_DIR": str(self.cache_dir / "uv-cache"), **self._extra_env}

    def uv_version(self) -> str:
        if self._uv_version is None:
            try:
                out = subprocess.run(
                    [self.uv, "--version"], capture_output=True, timeout=10, check=True
                ).stdout
                self._uv_version = out.decode().split()[1] if out.split() else "unknown"
            except (OSError, subprocess.SubprocessError, IndexError):
                self._uv_version = "unknown"
        return self._uv_version

    def is_ready(
        self,
        requirements: Path | None,
        python_version: str | None,
        *,
        packages: Sequence[str] = (),
    ) -> bool:
        """True when the environment exists (or none is needed): for `pipelines list`."""
        if requirements is None and not packages:
            return True
        env_hash = self._identity(requirements, self.interpreter(python_version), packages)
        return (self.cache_dir / env_hash[:32] / READY).is_file()


def _base_executable() -> Path:
    """The interpreter under this worker's venv: pipelines must not see conveyor's packages."""
    base = getattr(sys, "_base_executable", None) or sys.executable
    return Path(base)


def _describe(requirements: Path | None, packages: Sequence[str]) -> str:
    """What an environment is built from, for its log lines and errors."""
    parts = [requirements.name] if requirements is not None else []
    if packages:
        parts.append(" ".join(packages))
    return " + ".join(parts)


def is_lock(requirements: Path) -> bool:
    """A `requirements.txt.lock` (discovery prefers it to requirements.txt): exact pins."""
    return requirements.name.endswith(".lock")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else 0 for part in version.split("."))


def _matches(version: str, wanted: str) -> bool:
    return version == wanted or version.startswith(wanted + ".")


def _probe_version(path: Path) -> str | None:
    try:
        out = subprocess.run(
            [str(path), "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
            capture_output=True,
            timeout=10,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        return None
    version = out.strip()
    return version if re.match(r"^\d+\.\d+\.\d+$", version) else None
