"""A task's params as a JSON Schema: made from its signature where the code is, checked where it
is not. Every producer checks params with the same schema, whether or not it imported the task."""

from __future__ import annotations

import copy
import hashlib
import threading
from typing import Any

import jsonschema_rs
import orjson
from pydantic import BaseModel
from pydantic.errors import PydanticUserError

from domain.errors import InvalidInput

#: A schema for params whose types have no JSON Schema: an object, checked by the worker.
ANY_OBJECT: dict[str, Any] = {"type": "object"}


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """The JSON Schema of a params model (pydantic's, draft 2020-12)."""
    try:
        return model.model_json_schema()
    except PydanticUserError:  # a type with no JSON form (a callable, say): the worker checks
        return dict(ANY_OBJECT)


def fingerprint(value: Any) -> str:
    """A stable hash of a JSON value (keys sorted): what a catalog entry's version is made of."""
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()


_validators: dict[str, jsonschema_rs.Validator] = {}
_lock = threading.Lock()


def _validator(schema: dict[str, Any]) -> jsonschema_rs.Validator:
    key = fingerprint(schema)
    found = _validators.get(key)
    if found is None:
        found = jsonschema_rs.validator_for(schema, validate_formats=True)
        with _lock:
            _validators[key] = found
    return found


def check_params(schema: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """`params` if they satisfy `schema`, with the defaults of missing top-level fields filled in;
    otherwise an InvalidInput naming the first wrong field (`params.customer_id: ...`)."""
    validator = _validator(schema)
    if not validator.is_valid(params):
        errors = list(validator.iter_errors(params))
        # A missing or wrong declared field says more than an unexpected one (`{"x": 1}` for a
        # task that needs `customer_id` is most likely a misspelling of the latter).
        declared = [e for e in errors if getattr(e.kind, "name", "") != "additionalProperties"]
        raise _invalid((declared or errors)[0])
    defaults = {
        name: prop["default"]
        for name, prop in schema.get("properties", {}).items()
        if isinstance(prop, dict) and "default" in prop and name not in params
    }
    if not defaults:
        return params
    return {**params, **copy.deepcopy(defaults)}


def _invalid(error: jsonschema_rs.ValidationError) -> InvalidInput:
    path = [str(p) for p in error.instance_path]
    kind = getattr(error.kind, "name", "")
    message = error.message
    if kind == "required":
        path.append(str(getattr(error.kind, "property", "")))
        message = "missing (required)"
    elif kind in {"anyOf", "oneOfNotValid"}:
        # Optional[X] is anyOf [X, null]: say what each allowed form found wrong.
        branches = getattr(error.kind, "context", None) or []
        reasons = [branch[0].message for branch in branches if branch]
        if reasons:
            message = "none of the allowed forms: " + "; ".join(reasons)
    elif kind == "additionalProperties":
        unexpected = getattr(error.kind, "unexpected", None) or []
        if unexpected:
            path.append(str(unexpected[0]))
        message = "unknown field"
    field = ".".join(path)
    where = f"params.{field}" if field else "params"
    return InvalidInput(f"{where}: {message}", field=field or "params")
