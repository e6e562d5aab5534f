"""pipelines/README.md's compatibility table tells the truth: every documented key is honoured
by the parser, or produces the warning (or error) the table quotes; and every key the parser
knows is in the table."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from domain.pipelines.config import FASTFLOW_UNSUPPORTED, ParsedConfig, PipelineConfig, parse_config

README = Path(__file__).resolve().parents[2] / "pipelines" / "README.md"
SRC = "pipelines/sample/pipeline.json"
TOKEN = "gAAAAAB-sample-token-never-opened-here"

#: One pipeline.json per documented row (keyed by the row's first cell, backticks removed).
SAMPLES: dict[str, dict[str, Any]] = {
    "enabled": {"enabled": False},
    "description": {"description": "nightly export"},
    "tags": {"tags": ["crm", "daily"]},
    'type = "script"': {"type": "script"},
    'type = "notebook"': {"type": "notebook"},
    "cells": {"cells": [{"retries": 2, "delay_seconds": 1}, {"retries": 0}]},
    "python_version": {"python_version": "3.11"},
    "timeout": {"timeout": 90},
    "retry_attempts": {"retry_attempts": 2},
    "retry_strategy": {"retry_strategy": {"type": "fixed_delay", "delay": 5}},
    "cpu_hard_limit": {"cpu_hard_limit": 0.5},
    "mem_hard_limit": {"mem_hard_limit": "256m"},
    "cpu_soft_limit": {"cpu_soft_limit": 0.25},
    "mem_soft_limit": {"mem_soft_limit": "128m"},
    "default_env": {"default_env": {"LOG_LEVEL": "debug"}},
    "encrypted_env": {"encrypted_env": {"CRM_KEY": TOKEN}},
    "max_instances": {"max_instances": 1},
    "schedule_cron": {"schedule_cron": "15 3 * * 1-5"},
    "schedule_interval_seconds": {"schedule_interval_seconds": 600},
    "schedule_start": {"schedule_cron": "0 * * * *", "schedule_start": "2026-02-01T00:00:00"},
    "schedule_end": {"schedule_cron": "0 * * * *", "schedule_end": "2026-12-31T23:59:59"},
    "run_once_at": {"run_once_at": "2026-03-01T12:00:00"},
    "schedules": {"schedules": [{"id": "prod", "schedule_cron": "0 8 * * *"}]},
    "restart_on_crash": {"restart_on_crash": True},
    "restart_cooldown": {"restart_cooldown": 30},
    "restart_interval": {"restart_interval": "0 3 * * *"},
    "webhook_key": {"webhook_key": "a-key-in-the-url"},
    "downstream_triggers": {"downstream_triggers": [{"pipeline": "report", "on_failure": True}]},
    "downstream_triggers[].on_route": {
        "downstream_triggers": [{"pipeline": "report", "on_route": "full"}]
    },
    "downstream_triggers[].run_config_id": {
        "downstream_triggers": [{"pipeline": "report", "run_config_id": "prod"}]
    },
    "retries": {"retries": 3},
    "retry_delay": {"retry_delay": 60},
    "delay_seconds": {"delay_seconds": 1},
    "secrets": {"secrets": ["CRM_TOKEN"]},
    "timezone": {"schedule_cron": "0 9 * * *", "timezone": "Europe/Berlin"},
    "queue": {"queue": "exports"},
    "priority": {"priority": 7},
}


@dataclass(frozen=True)
class Row:
    label: str  # the first cell without backticks, e.g. 'type = "notebook"'
    key: str  # the pipeline.json key it is about, e.g. 'type' or 'downstream_triggers'
    verdict: str  # the third cell

    @property
    def honoured(self) -> bool:
        return self.verdict.startswith("honoured")

    def quoted(self, word: str) -> str | None:
        """The text in quotes after `warned:` or `refused:`, if the row says so."""
        match = re.search(rf'\b{word}: "([^"]+)"', self.verdict)
        return match.group(1) if match else None


def table_rows() -> list[Row]:
    text = README.read_text()
    section = text.split("## pipeline.json: Fast-Flow's keys in conveyor", 1)[1]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 3 or not cells[0].startswith("`"):
            continue
        label = cells[0].replace("`", "")
        key = re.split(r"[\s=\[.]", label, maxsplit=1)[0]
        rows.append(Row(label, key, cells[2]))
    return rows


ROWS = table_rows()


def parsed(row: Row) -> ParsedConfig:
    assert row.label in SAMPLES, f"add a pipeline.json sample for the row {row.label!r}"
    return parse_config(json.dumps(SAMPLES[row.label]), source=SRC)


def mentions(warning: str, row: Row) -> bool:
    return f"'{row.key}" in warning  # 'key' or 'key[0].nested'


def test_the_table_is_there_and_every_sample_is_a_row() -> None:
    assert len(ROWS) >= 30
    assert sorted(SAMPLES) == sorted(r.label for r in ROWS)  # no stale sample, no missing one
    for row in ROWS:
        assert row.honoured or row.quoted("warned") or row.quoted("refused"), row


def test_every_key_the_parser_knows_is_documented() -> None:
    documented = {r.key for r in ROWS}
    missing = (set(PipelineConfig.model_fields) | set(FASTFLOW_UNSUPPORTED)) - documented
    assert missing == set()


@pytest.mark.parametrize("row", ROWS, ids=[r.label for r in ROWS])
def test_each_row_is_what_the_parser_does(row: Row) -> None:
    result = parsed(row)
    refused, warned = row.quoted("refused"), row.quoted("warned")
    if refused is not None:
        assert result.config is None and refused in (result.error or ""), result
        assert f"key '{row.key}'" in (result.error or "")
        return
    assert result.error is None and result.config is not None, result.error
    if row.honoured:
        # Taken as a field of the config, not dropped as an unknown key.
        assert row.key in PipelineConfig.model_fields
        assert row.key in result.config.model_fields_set
    if warned is not None:
        assert any(warned in w and mentions(w, row) for w in result.warnings), result.warnings
    else:
        assert not any(mentions(w, row) for w in result.warnings), result.warnings
