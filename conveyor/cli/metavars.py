"""What `--help` calls each option's value: `--every DURATION`, `--params-json JSON`, not `<str>`.

One table for the whole command tree, so every command that takes `--delay` or `--project`
names its value the same way; an option that sets its own `metavar=` keeps it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

# Where the option's last word would mislead or say too little.
BY_OPTION = {
    "--every": "DURATION",
    "--delay": "DURATION",
    "--params-json": "JSON",
    "--param": "KEY=VALUE",
    "--at": "DATETIME",
    "--priority": "0-9",
    "--jitter": "SECONDS",
    "--timeout": "SECONDS",
    "--wait": "SECONDS",
    "--port": "PORT",
    "--on": "STATUSES",
    "--by": "GROUPING",
    "--loglevel": "LEVEL",
    "--monthly-tokens": "TOKENS",
}


def metavar_for(option: str, annotation: Any) -> str:
    """The name `--help` shows after `option`: the table's, else one from its type or name."""
    if option in BY_OPTION:
        return BY_OPTION[option]
    if annotation is datetime:
        return "DATETIME"
    if annotation is int:
        return "N"
    if annotation is float:
        return "NUMBER"
    return option.lstrip("-").rsplit("-", 1)[-1].upper()  # --idempotency-key KEY, --tz TZ


def name_values(command: Any) -> None:
    """Give every option and argument under `command` (a click command or group) a metavar."""
    for param in command.params:
        if param.metavar is not None or getattr(param, "is_flag", False):
            continue
        if param.param_type_name == "argument":
            param.metavar = str(param.name).upper()
        else:
            longest = max(param.opts, key=len)
            param.metavar = metavar_for(longest, param.type_descriptor.annotation)
    for sub in getattr(command, "commands", {}).values():
        name_values(sub)
