"""pipeline.json: Fast-Flow's keys and meanings, bad input named by file, key and expected."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pytest

from domain.errors import InvalidInput
from domain.pipelines.config import parse_config, parse_memory
from domain.pipelines.env import (
    RUN_ENV_KEY,
    compose_env,
    params_env,
    pipeline_params,
    run_env_overrides,
)
from domain.pipelines.retry import StrategyRetryPolicy
from domain.security.masking import MASK, Masker, mask
from domain.security.secrets import check_name, check_value
from worker.pipelines.uvconfig import uv_environment

SRC = "pipelines/etl/pipeline.json"
FIXTURES = Path(__file__).resolve().parents[1] / "pipelines_fixtures"


def parse(data: object) -> tuple[object, str | None, tuple[str, ...]]:
    parsed = parse_config(json.dumps(data), source=SRC)
    return parsed.config, parsed.error, parsed.warnings


def test_no_file_means_fast_flow_defaults() -> None:
    config = parse_config(None, source=SRC).config
    assert config is not None
    assert (config.enabled, config.type, config.max_attempts, config.timeout_s) == (
        True,
        "script",
        1,
        None,
    )
    assert config.secrets == [] and config.default_env == {}


@pytest.mark.parametrize("name", ["test_simple", "test_failing", "test_logging"])
def test_fast_flow_fixture_files_are_valid(name: str) -> None:
    parsed = parse_config((FIXTURES / name / "pipeline.json").read_text(), source=name)
    assert parsed.error is None and parsed.warnings == ()


def test_fast_flow_keys_keep_their_meaning() -> None:
    config, error, warnings = parse(
        {
            "timeout": 0,
            "retry_attempts": 3,
            "mem_hard_limit": "512M",
            "mem_soft_limit": "1.5g",
            "cpu_hard_limit": 2,
            "default_env": {"DEBUG": False, "N": 3, "NAME": "x"},
            "schedule_cron": "0 9 * * *",
            "timezone": "Europe/Berlin",
            "schedule_start": "2026-01-01T00:00:00Z",
            "downstream_triggers": [{"pipeline": "next", "on_failure": True}],
        }
    )
    assert error is None and warnings == ()
    assert config.timeout_s is None  # type: ignore[attr-defined]  # 0 = no timeout
    assert config.max_attempts == 4  # type: ignore[attr-defined]
    assert config.mem_hard_limit == 512 * 2**20  # type: ignore[attr-defined]
    assert config.mem_soft_limit == int(1.5 * 2**30)  # type: ignore[attr-defined]
    assert config.default_env == {"DEBUG": "false", "N": "3", "NAME": "x"}  # type: ignore[attr-defined]
    trigger = config.downstream_triggers[0]  # type: ignore[attr-defined]
    assert (trigger.pipeline, trigger.on_success, trigger.on_failure) == ("next", True, True)
    spec = config.schedule_spec()  # type: ignore[attr-defined]
    assert spec["trigger"] == "cron" and spec["timezone"] == "Europe/Berlin"
    assert spec["start_at"] == datetime(2026, 1, 1, tzinfo=UTC)


@pytest.mark.parametrize(
    ("data", "key", "expected"),
    [
        ({"timeout": -5}, "timeout", "a number of seconds >= 0"),
        ({"timeout": "60"}, "timeout", "a number of seconds >= 0"),
        ({"enabled": "yes"}, "enabled", "true or false"),
        ({"retry_attempts": 1.5}, "retry_attempts", "a whole number from 0 to 99"),
        ({"mem_hard_limit": "lots"}, "mem_hard_limit", 'a size like "512M"'),
        ({"mem_hard_limit": "10k"}, "mem_hard_limit", "at least 1M"),
        ({"tags": "etl"}, "tags", "a list of strings"),
        ({"secrets": ["has-dash"]}, "secrets[0]", "a list of secret names"),
        ({"default_env": {"X": {"nested": 1}}}, "default_env.X", "an object of environment"),
        ({"python_version": "three"}, "python_version", 'a Python version such as "3.11"'),
        ({"schedule_cron": "every day"}, "schedule_cron", "a 5-field cron expression"),
        ({"timezone": "Mars/Olympus"}, "timezone", "an IANA timezone"),
        ({"retry_strategy": {"type": "sometimes"}}, "retry_strategy", "exponential_backoff"),
        ({"retry_strategy": {"type": "fixed_delay", "delay": -1}}, "retry_strategy.delay", ">= 0"),
        ({"retry_strategy": {"type": "custom_schedule"}}, "retry_strategy.delays", "present"),
        (
            {"downstream_triggers": [{"on_success": True}]},
            "downstream_triggers[0].pipeline",
            "present",
        ),
    ],
)
def test_bad_values_name_file_key_and_expected(data: object, key: str, expected: str) -> None:
    config, error, _ = parse(data)
    assert config is None and error is not None
    assert error.startswith(f"{SRC}: key {key!r}: ")
    assert expected in error


def test_every_bad_key_is_reported_at_once() -> None:
    _, error, _ = parse({"timeout": -1, "retry_attempts": -1})
    assert error is not None and "'timeout'" in error and "'retry_attempts'" in error


def test_invalid_json_and_non_object() -> None:
    bad = parse_config('{"timeout": 5,,}', source=SRC)
    assert bad.config is None and bad.error is not None
    assert bad.error.startswith(f"{SRC}: invalid JSON at line 1 column")
    listed = parse_config("[1, 2]", source=SRC)
    assert listed.error == f"{SRC}: expected a JSON object at the top level; got list"
    binary = parse_config(b"\xff\xfe{", source=SRC)
    assert binary.error is not None and SRC in binary.error


def test_unknown_and_unsupported_keys_are_warnings() -> None:
    config, error, warnings = parse(
        {
            "timout": 5,
            "restart_on_crash": True,
            "downstream_triggers": [{"pipeline": "b", "on_route": "full"}],
        }
    )
    assert error is None and config is not None
    assert any("unknown key 'timout' is ignored (did you mean 'timeout'?)" in w for w in warnings)
    assert any("'restart_on_crash' is ignored" in w for w in warnings)
    assert any("downstream_triggers[0].on_route" in w for w in warnings)


def test_notebook_cells_are_parsed_with_fast_flows_defaults() -> None:
    parsed = parse_config(
        json.dumps({"type": "notebook", "cells": [{"retries": 2, "delay_seconds": 0.5}, {}]}),
        source=SRC,
    )
    config = parsed.config
    assert config is not None and parsed.warnings == ()
    assert [(c.retries, c.delay_seconds) for c in config.cells] == [(2, 0.5), (0, 1.0)]
    assert config.max_attempts == 1  # cells are retried, never the whole notebook run


def test_notebook_run_retries_and_script_cells_are_warned_about() -> None:
    config, error, warnings = parse({"type": "notebook", "retry_attempts": 3})
    assert error is None and config is not None and config.max_attempts == 1  # type: ignore[attr-defined]
    assert warnings == (
        f"{SRC}: key 'retry_attempts' is ignored: notebook pipelines are retried cell by cell "
        "(use 'cells' or a cell's metadata.fastflow)",
    )
    config, error, warnings = parse({"cells": [{"retries": 1}], "retry_attempts": 3})
    assert error is None and config.max_attempts == 4  # type: ignore[attr-defined]
    assert any("'cells' is ignored: it applies to notebook pipelines only" in w for w in warnings)


@pytest.mark.parametrize(
    ("cells", "expected"),
    [
        ({"retries": 1}, "key 'cells': expected a list"),
        ([{"retries": -1}], "key 'cells[0].retries': expected a number >= 0; got -1"),
        ([{}, {"delay_seconds": "2"}], "key 'cells[1].delay_seconds': expected a number"),
        ([{"retry": 1}], "key 'cells[0].retry': not allowed here (cells takes: retries,"),
    ],
)
def test_bad_cells_name_the_item_and_key(cells: object, expected: str) -> None:
    _, error, _ = parse({"type": "notebook", "cells": cells})
    assert error is not None and expected in error, error


def test_webhook_key_is_a_warning() -> None:
    config, error, warnings = parse({"webhook_key": "abc"})
    assert error is None and config is not None
    assert any("legacy trigger" in w for w in warnings)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("512M", 512 * 2**20),
        ("1G", 2**30),
        ("1.5g", int(1.5 * 2**30)),
        ("800m", 800 * 2**20),
        ("2GiB", 2 * 2**30),
        (4 * 2**20, 4 * 2**20),
    ],
)
def test_memory_sizes(text: object, size: int) -> None:
    assert parse_memory(text) == size


def test_retry_strategies() -> None:
    exp, _, _ = parse(
        {"retry_strategy": {"type": "exponential_backoff", "initial_delay": 10, "max_delay": 50}}
    )
    policy = exp.retry_policy  # type: ignore[attr-defined]
    assert [policy.delay_s(n) for n in (1, 2, 3, 4)] == [10, 20, 40, 50]
    fixed = StrategyRetryPolicy.from_strategy(None)
    assert (fixed.base_s, fixed.max_s) == (2.0, 300.0)  # conveyor's default without a strategy
    custom, _, _ = parse({"retry_strategy": {"type": "custom_schedule", "delays": [1, 5, 30]}})
    policy = custom.retry_policy  # type: ignore[attr-defined]
    assert [policy.delay_s(n) for n in (1, 2, 3, 4)] == [1, 5, 30, 30]
    fix, _, _ = parse({"retry_strategy": {"type": "fixed_delay", "delay": 7}})
    assert fix.retry_policy.delay_s(3) == 7  # type: ignore[attr-defined]


def test_env_precedence_later_layers_win() -> None:
    params = {
        "LEVEL": "param",
        "n": 3,
        "flag": True,
        "nested": {"a": 1},
        RUN_ENV_KEY: {"LEVEL": "override", "ONLY_OVERRIDE": 1},
    }
    env = compose_env(
        defaults={"LEVEL": "default", "PATH": "/bin", "KEEP": "d"},
        pipeline_env={"LEVEL": "pipeline", "FROM_JSON": "j"},
        secrets={"LEVEL": "secret", "TOKEN": "s3cret"},
        overrides=run_env_overrides(params),
        params=params_env(params),
        reserved={"CONVEYOR_RUN_ID": "r1"},
    )
    assert env["LEVEL"] == "param"
    assert (env["ONLY_OVERRIDE"], env["TOKEN"], env["FROM_JSON"], env["KEEP"]) == (
        "1",
        "s3cret",
        "j",
        "d",
    )
    assert (env["n"], env["flag"]) == ("3", "true")
    assert "nested" not in env and RUN_ENV_KEY not in env
    assert pipeline_params(params) == {k: v for k, v in params.items() if k != RUN_ENV_KEY}


def test_reserved_variables_cannot_be_overridden() -> None:
    env = compose_env(
        defaults={},
        pipeline_env={"CONVEYOR_RUN_ID": "fake"},
        secrets={},
        overrides={},
        params={"CONVEYOR_RUN_ID": "fake"},
        reserved={"CONVEYOR_RUN_ID": "real"},
    )
    assert env == {"CONVEYOR_RUN_ID": "real"}


def test_bad_env_overrides_are_refused() -> None:
    with pytest.raises(InvalidInput, match=r"params\._env: expected an object"):
        run_env_overrides({RUN_ENV_KEY: ["A=1"]})
    with pytest.raises(InvalidInput):
        run_env_overrides({RUN_ENV_KEY: {"not valid": "x"}})


def test_masking() -> None:
    assert mask("token=abcd1234 and abcd1234!", ["abcd1234"]) == f"token={MASK} and {MASK}!"
    masker = Masker(["abcd", "abcd-longer", "line-one\nline-two"])
    assert masker("abcd-longer abcd") == f"{MASK} {MASK}"
    assert masker("printed: line-two") == f"printed: {MASK}"
    assert Masker(["ab"])("ab") == "ab"  # too short to mask; refused at `secrets set` anyway
    assert not Masker([])


def test_secret_names_and_values_are_checked() -> None:
    with pytest.raises(InvalidInput, match="secret name 'a/b'"):
        check_name("a/b")
    with pytest.raises(InvalidInput, match="at least 4 characters"):
        check_value("abc", is_parameter=False)
    assert check_value("abc", is_parameter=True) == "abc"


def test_uv_honours_pip_configuration(tmp_path: Path) -> None:
    conf = tmp_path / "pip.conf"
    conf.write_text(
        "[global]\nindex-url = https://mirror.example/simple\n"
        "extra-index-url = file:///srv/a/simple\n    file:///srv/b/simple\n"
        "find-links = /srv/wheels\ncert = /etc/ca.pem\n[install]\ntimeout = 42\n"
    )
    env = {"PIP_CONFIG_FILE": str(conf), "PIP_CONSTRAINT": "/srv/c.txt", "XDG_CONFIG_DIRS": "/none"}
    uv = uv_environment(env, home=tmp_path, prefix=tmp_path)
    assert uv["UV_DEFAULT_INDEX"] == "https://mirror.example/simple"
    assert uv["UV_EXTRA_INDEX_URL"] == "file:///srv/a/simple file:///srv/b/simple"
    assert uv["UV_FIND_LINKS"] == "/srv/wheels"
    assert (uv["SSL_CERT_FILE"], uv["UV_HTTP_TIMEOUT"], uv["UV_CONSTRAINT"]) == (
        "/etc/ca.pem",
        "42",
        "/srv/c.txt",
    )
    assert uv["UV_INDEX_STRATEGY"] == "unsafe-best-match"
    assert uv["UV_PYTHON_DOWNLOADS"] == "never"
    explicit = uv_environment({**env, "UV_FIND_LINKS": "/mine"}, home=tmp_path, prefix=tmp_path)
    assert "UV_FIND_LINKS" not in explicit  # an explicit UV_* setting wins


@pytest.mark.parametrize("version", ["3.11", "3.11.2", "2.1", "3.14"])
def test_any_python_version_parses_whether_a_worker_has_it_is_asked_at_run_time(
    version: str,
) -> None:
    config, error, _ = parse({"python_version": version})
    assert error is None and config.python_version == version  # type: ignore[attr-defined]
