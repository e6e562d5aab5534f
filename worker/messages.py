"""What a `conveyor.execute` message shows Celery's tools: one function builds those headers.

Every message carries the run id as its only argument, so without these headers Flower, the
worker's log lines and task events would name every run `conveyor.execute(<uuid>)`. Protocol 2
has headers for exactly this: `shadow` (the name shown instead of the task's), `argsrepr` and
`kwargsrepr` (the arguments as shown). They change nothing the worker executes: the body still
holds only the run id, and the executor reads the run's params from its row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from domain.ports import Dispatch
from domain.security.audit import mask as mask_secret_names
from domain.security.masking import MASK, NO_SECRETS, Masker

#: As Celery bounds its own argsrepr/kwargsrepr (amqp.argsrepr_maxsize): headers stay small
#: whatever the params weigh, and Flower's event store with them.
REPR_MAX_CHARS = 1024


def display_headers(dispatch: Dispatch, masker: Masker = NO_SECRETS) -> dict[str, str]:
    """The `shadow`, `argsrepr` and `kwargsrepr` headers of `dispatch`'s message.

    The params are shown as keyword arguments, with every value a secret could be masked:
    entries whose key names a secret (`password`, `api_key`, `token`, ...), conveyor's own API
    tokens, and any value `masker` knows, in every serialized form it takes."""
    return {
        "shadow": dispatch.name,
        "argsrepr": repr([str(dispatch.run_id)]),
        "kwargsrepr": params_repr(dispatch.params, masker),
    }


def params_repr(params: Mapping[str, Any] | None, masker: Masker = NO_SECRETS) -> str:
    """`params` as Python shows a dict, secrets masked, at most REPR_MAX_CHARS long."""
    if not params:
        return "{}"
    text = masker(repr(mask_secret_names(dict(params))))
    if len(text) <= REPR_MAX_CHARS:
        return text
    # Cut after masking, and mask what the cut may have left of a secret's beginning.
    return masker.cut_short(text[: REPR_MAX_CHARS - len(MASK) - 1]) + "…"
