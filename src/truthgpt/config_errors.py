"""Config errors as users read them: pydantic's ValidationErrors and unknown keys, each turned
into one line with the full key path, the bad value, what is allowed and a "did you mean".

The schema lives in config.py, which imports this module; the schema's root class comes in as
an argument, so nothing here imports config.py back.
"""

from __future__ import annotations

from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticCustomError

from truthgpt.errors import closest

# pydantic's bound errors: their message already says the one bound a field may have.
_BOUND_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def field_error(field: str, message: str, allowed: str) -> PydanticCustomError:
    """An error a section's own validator finds in one of its fields: reported under that
    field's key with its value (not the whole section's dict), see `format_errors`."""
    return PydanticCustomError("field_value", message, {"field": field, "allowed": allowed})


def unknown_key_problem(loc: list[str], allowed: list[str]) -> str:
    """`a.b.kye: unknown key. Did you mean 'a.b.key'? Allowed here: ...`."""
    hint = closest(loc[-1], allowed)
    suggestion = f" Did you mean {'.'.join(loc[:-1] + [hint])!r}?" if hint else ""
    return f"{'.'.join(loc)}: unknown key.{suggestion} Allowed here: {', '.join(allowed)}"


def format_errors(
    exc: ValidationError,
    schema: type[BaseModel],
    raw: dict[str, Any],
    flags: dict[str, str] | None = None,
) -> str:
    """One message for all of `exc`, raised validating `raw` against the model tree `schema`.
    flags: key path -> the command-line flag that set it, named in its place."""
    lines = [f"{exc.error_count()} config error(s):"]
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        context = error.get("ctx") or {}
        if "field" in context:  # a section's validator about one of its fields (field_error)
            loc.append(context["field"])
        key = ".".join(loc) or "<top>"
        if error["type"] == "extra_forbidden":
            lines.append("  " + unknown_key_problem(loc, _allowed_keys(schema, loc[:-1])))
            continue
        message = error["msg"].removeprefix("Value error, ")
        value = _lookup(raw, loc)
        # A whole section's dict would bury the one value that is wrong.
        shown = error["type"] != "missing" and not isinstance(value, dict)
        got = f" (got {value!r})" if shown else ""
        allowed = context.get("allowed") or _allowed_values(schema, loc)
        if not allowed and error["type"] != "value_error":  # own validators say it themselves
            allowed = _allowed_range(schema, loc, one_bound_said=error["type"] in _BOUND_ERRORS)
        if error["type"] == "literal_error" and allowed:  # pydantic's message lists them too
            message = "unknown value"
            hint = closest(value, allowed.split(", ")) if isinstance(value, str) else None
            got = f" (got {value!r}, did you mean {hint!r}?)" if hint else got
        suffix = f"; allowed: {allowed}" if allowed and "allowed" not in message else ""
        lines.append(f"  {(flags or {}).get(key, key)}: {message}{got}{suffix}")
    return "\n".join(lines)


def _section_class(schema: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    cls: Any = schema
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(cls, type) else None
        if field is None:
            return None
        cls = field.annotation
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
            return None
    return cls


def _allowed_keys(schema: type[BaseModel], loc: list[str]) -> list[str]:
    cls = _section_class(schema, loc)
    return list(cls.model_fields) if cls else []


def _allowed_values(schema: type[BaseModel], loc: list[str]) -> str:
    cls = _section_class(schema, loc[:-1])
    field = cls.model_fields.get(loc[-1]) if cls and loc else None
    if field is None:
        return ""
    # A Literal, or a Literal or None (an empty value in the YAML).
    union = get_origin(field.annotation) in (Union, UnionType)
    parts = get_args(field.annotation) if union else (field.annotation,)
    literals = [part for part in parts if get_origin(part) is Literal]
    optional = type(None) in parts
    if not literals or len(literals) + optional != len(parts):
        return ""
    choices = [str(choice) for part in literals for choice in get_args(part)]
    # How "empty" is written: nothing after the colon in YAML, null (or nothing) in --set.
    return ", ".join(choices + ["empty (YAML: nothing or null; --set key=null)"] * optional)


def _allowed_range(schema: type[BaseModel], loc: list[str], one_bound_said: bool = False) -> str:
    """ "an integer >= 8", "a number in (0, 1]": a numeric field's type and bounds, or ""."""
    cls = _section_class(schema, loc[:-1])
    field = cls.model_fields.get(loc[-1]) if cls and loc else None
    if field is None:
        return ""
    parts = get_args(field.annotation) or (field.annotation,)
    kinds = [part for part in parts if part in (int, float)]
    if len(kinds) != 1:
        return ""
    kind = "an integer" if kinds[0] is int else "a number"
    lower = upper = None
    for item in field.metadata:
        for name, sign, bracket in (("gt", ">", "("), ("ge", ">=", "[")):
            if getattr(item, name, None) is not None:
                lower = (sign, bracket, getattr(item, name))
        for name, sign, bracket in (("lt", "<", ")"), ("le", "<=", "]")):
            if getattr(item, name, None) is not None:
                upper = (sign, bracket, getattr(item, name))
    if lower and upper:
        text = f"{kind} in {lower[1]}{lower[2]}, {upper[2]}{upper[1]}"
    elif lower or upper:
        if one_bound_said:
            return ""
        sign, _, bound = lower or upper
        text = f"{kind} {sign} {bound}"
    else:
        text = kind
    return text + (", or empty" if type(None) in parts else "")


def _lookup(raw: Any, loc: list[str]) -> Any:
    node = raw
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
    return node
