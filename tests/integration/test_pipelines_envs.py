"""uv environments: one build per hash, shared by concurrent first runs, reused, bounded."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.pipeline_support import FIXTURES, ROOT
from worker.pipelines.envs import READY, EnvInfo, EnvManager, InterpreterNotFound, PipelineEnvError

pytestmark = pytest.mark.slow

REQUIREMENTS = FIXTURES / "test_with_requirements" / "requirements.txt"


def quiet(message: str, level: str = "info") -> None:
    """Build messages go nowhere in these tests."""


def test_no_requirements_means_the_bare_interpreter(tmp_path: Path) -> None:
    info = EnvManager(tmp_path).ensure(None, None, log=quiet)
    assert (info.env_hash, info.built, info.location) == (None, False, None)
    out = subprocess.run(
        [str(info.python), "-c", "import sys; print(sys.prefix)"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    assert out != sys.prefix  # not the worker's venv: conveyor's packages stay out of sight


def test_concurrent_first_runs_share_one_build(tmp_path: Path) -> None:
    manager = EnvManager(tmp_path / "envs")
    results: list[EnvInfo] = []
    barrier = threading.Barrier(3)

    def first_run() -> None:
        barrier.wait()
        results.append(EnvManager(manager.cache_dir).ensure(REQUIREMENTS, None, log=quiet))

    threads = [threading.Thread(target=first_run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(r.built for r in results) == [False, False, True]
    assert len({r.location for r in results}) == 1
    assert [
        p.name for p in (tmp_path / "envs").iterdir() if p.is_dir() and p.name != "uv-cache"
    ] == [
        results[0].location.name  # type: ignore[union-attr]
    ]
    # After a restart (a new manager, as a new worker process has) it is reused, not rebuilt.
    again = EnvManager(tmp_path / "envs").ensure(REQUIREMENTS, None, log=quiet)
    assert (again.built, again.location) == (False, results[0].location)
    ready = json.loads((again.location / READY).read_text())  # type: ignore[operator]
    assert ready["requirements"] == "requirements.txt" and ready["uv"] != "unknown"


def test_concurrent_first_runs_in_separate_processes(tmp_path: Path) -> None:
    script = (
        "import sys; from pathlib import Path; from worker.pipelines.envs import EnvManager;"
        "info = EnvManager(Path(sys.argv[1])).ensure(Path(sys.argv[2]), None,"
        " log=lambda m, l='info': None); print(info.built, info.location)"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "envs"), str(REQUIREMENTS)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert sorted(o[0] for o in outs) == ["False", "True"]
    assert outs[0][1] == outs[1][1]


def test_an_unfinished_build_is_redone(tmp_path: Path) -> None:
    manager = EnvManager(tmp_path)
    info = manager.ensure(REQUIREMENTS, None, log=quiet)
    assert info.location is not None
    (info.location / READY).unlink()  # as if the worker died mid-build
    redone = EnvManager(tmp_path).ensure(REQUIREMENTS, None, log=quiet)
    assert redone.built and (redone.location / READY).is_file()  # type: ignore[operator]


def test_a_hanging_uv_is_stopped_by_the_timeout(tmp_path: Path) -> None:
    fake = tmp_path / "uv"
    fake.write_text(
        f"#!{sys.executable}\nimport time\nprint('resolving...', flush=True)\ntime.sleep(600)\n"
    )
    fake.chmod(0o755)
    manager = EnvManager(tmp_path / "envs", timeout_s=1, uv=str(fake))
    lines: list[str] = []
    with pytest.raises(PipelineEnvError, match=r"uv did not finish within 1s") as caught:
        manager.ensure(REQUIREMENTS, None, log=lambda m, level="info": lines.append(m))
    assert "resolving..." in str(caught.value)
    assert not any(p.is_dir() and (p / READY).exists() for p in (tmp_path / "envs").iterdir())


def test_waiting_for_another_build_stops_with_the_run(tmp_path: Path) -> None:
    manager = EnvManager(tmp_path)
    interpreter = manager.interpreter(None)
    env_hash = manager.env_hash(REQUIREMENTS.read_bytes(), interpreter)
    lock = tmp_path / f"{env_hash[:32]}.lock"
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with lock.open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another process is building
        with pytest.raises(PipelineEnvError, match="stopped while waiting"):
            manager.ensure(REQUIREMENTS, None, log=quiet, should_stop=stop.is_set)
        # It returned while the other build still held the lock: because the run stopped.
        assert stop.is_set()
    assert not any(p.is_dir() and (p / READY).exists() for p in tmp_path.iterdir())


def test_python_versions(tmp_path: Path) -> None:
    manager = EnvManager(tmp_path)
    own = ".".join(map(str, sys.version_info[:2]))
    assert manager.interpreter(own).version.startswith(own)
    with pytest.raises(InterpreterNotFound, match=r"python_version '3\.2': no such interpreter"):
        manager.interpreter("3.2")


SHOW_VERSION_AND_PREFIX = "import platform, sys; print(platform.python_version(), sys.prefix)"


def system_python311() -> tuple[Path, str]:
    """The machine's python3.11 (not this venv's interpreter) and its exact version."""
    found = shutil.which("python3.11", path="/usr/bin:/usr/local/bin")
    if found is None:
        pytest.skip("no python3.11 in /usr/bin or /usr/local/bin")
    version = subprocess.run(
        [found, "-c", "import sys; print('%d.%d.%d' % sys.version_info[:3])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    return Path(found), version


def test_python_version_is_found_by_uv_among_the_machines_interpreters(tmp_path: Path) -> None:
    path, version = system_python311()
    own = ".".join(map(str, sys.version_info[:3]))
    manager = EnvManager(tmp_path)
    found = manager.interpreter(version)  # exact: uv's answer, unless the worker's own matches
    assert found.version == version
    if version != own:
        assert found.path.resolve() == path.resolve()
    assert version in manager.installed_versions()
    # A venv on it runs that interpreter, not the worker's.
    info = manager.ensure(REQUIREMENTS, version, log=quiet)
    out = subprocess.run(
        [
            str(info.python),
            "-c",
            "import platform, sys; print(platform.python_version(), sys.prefix)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert out == [version, str(info.location)]


def test_a_python_version_nobody_has_fails_in_one_line_naming_what_there_is(
    tmp_path: Path,
) -> None:
    manager = EnvManager(tmp_path)
    with pytest.raises(InterpreterNotFound) as caught:
        manager.ensure(None, "2.1", log=quiet)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("python_version '2.1': no such interpreter on this worker")
    own = ".".join(map(str, sys.version_info[:3]))
    assert f"it has Python {own}" in message or f", {own}" in message
    assert "Python 2.1" not in message


def test_a_lock_wins_over_requirements_and_is_installed_exactly(tmp_path: Path) -> None:
    folder = tmp_path / "locked"
    folder.mkdir()
    # requirements.txt would not resolve at all: only the lock can have built this.
    (folder / "requirements.txt").write_text("conveyor-no-such-package-xyz==1.0\n")
    lock = folder / "requirements.txt.lock"
    lock.write_text("six==1.17.0\n")
    manager = EnvManager(tmp_path / "envs")
    info = manager.ensure(lock, None, log=quiet)
    assert info.built
    ready = json.loads((info.location / READY).read_text())  # type: ignore[operator]
    assert ready["requirements"] == "requirements.txt.lock"
    out = subprocess.run(
        [str(info.python), "-c", "import six; print(six.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert out == "1.17.0"
    # The same pins as a plain requirements.txt are another environment (resolved, not synced).
    plain = manager.env_hash(lock.read_bytes(), manager.interpreter(None))
    assert info.env_hash != plain
    # Part of the hash: a changed lock is a new environment, an unchanged one is reused.
    assert manager.ensure(lock, None, log=quiet).built is False
    lock.write_text("six==1.17.0\n# recompiled\n")
    changed = manager.ensure(lock, None, log=quiet)
    assert changed.built and changed.env_hash != info.env_hash


def test_uv_sees_the_pip_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nfind-links = {tmp_path / 'wheels'}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "UV_"))}
    env["PIP_CONFIG_FILE"] = str(conf)  # read last, so it wins over the machine's files
    script = "from worker.pipelines.uvconfig import uv_environment; print(uv_environment())"
    out = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(tmp_path / "wheels") in out


def test_packages_conveyor_adds_are_installed_and_part_of_the_hash(tmp_path: Path) -> None:
    lock = tmp_path / "requirements.txt.lock"
    lock.write_text("six==1.17.0\n")
    manager = EnvManager(tmp_path / "envs")
    interpreter = manager.interpreter(None)
    added = ("humanize",)
    info = manager.ensure(lock, None, log=quiet, packages=added)
    assert info.built
    # After the exact lock, the added package: both are there.
    subprocess.run([str(info.python), "-c", "import six, humanize"], check=True)
    ready = json.loads((info.location / READY).read_text())  # type: ignore[operator]
    assert ready["packages"] == ["humanize"]
    plain = manager.env_hash(lock.read_bytes(), interpreter, locked=True)
    assert info.env_hash != plain  # the lock without them is another environment
    assert info.env_hash == manager.env_hash(
        lock.read_bytes(), interpreter, locked=True, packages=added
    )
    assert manager.is_ready(lock, None, packages=added)
    assert not manager.is_ready(lock, None)
    # No requirements at all: still a uv environment, because conveyor adds packages.
    bare = manager.ensure(None, None, log=quiet, packages=added)
    assert bare.built and bare.env_hash not in {None, info.env_hash}
    subprocess.run([str(bare.python), "-c", "import humanize"], check=True)
