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


# Names HF Trainer's TrainingArguments and peft's LoraConfig give keys of ours, which a
# spelling distance does not find (`rank` is no typo of `r`).
SYNONYMS = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "per_device_train_batch_size": "batch_size",
    "gradient_accumulation_steps": "grad_accum_steps",
    "max_grad_norm": "grad_clip",
    "lr_scheduler_type": "schedule",
    "save_steps": "save_every",
    "eval_steps": "eval_every",
    "logging_steps": "log_every",
    "save_total_limit": "keep_last",
    "seq_len": "max_seq_len",
    "max_length": "max_seq_len",
}


def unknown_key_problem(loc: list[str], allowed: list[str], elsewhere: list[str] = ()) -> str:
    """`a.b.kye: unknown key. Did you mean 'a.b.key'? Allowed here: ...`. elsewhere: every key
    path of the schema, searched for the name when none here is close (`max_steps` at the top
    -> 'training.max_steps')."""
    name = SYNONYMS.get(loc[-1], loc[-1])
    hint = closest(name, allowed)
    paths = [".".join(loc[:-1] + [hint])] if hint else []
    if not paths and elsewhere:
        name = closest(name, {path.rsplit(".", 1)[-1] for path in elsewhere})
        paths = [path for path in elsewhere if path.rsplit(".", 1)[-1] == name]
    suggestion = f" Did you mean {' or '.join(map(repr, paths))}?" if paths else ""
    return f"{'.'.join(loc)}: unknown key.{suggestion} Allowed here: {', '.join(allowed)}"


# pydantic's errors about the shape of a list or tuple value, reported at the list's key.
_SHAPE_ERRORS = {
    "list_type": "not a list",
    "tuple_type": "not a list",
    "too_short": "too few values",
    "too_long": "too many values",
}


def format_errors(
    exc: ValidationError,
    schema: type[BaseModel],
    raw: dict[str, Any],
    flags: dict[str, str] | None = None,
) -> str:
    """One message for all of `exc`, raised validating `raw` against the model tree `schema`.
    flags: key path -> the command-line flag that set it, named in its place."""
    problems: dict[str, str] = {}  # key path -> its line, one per key
    for error in exc.errors():
        loc, union = _key_path(schema, error["loc"])
        context = error.get("ctx") or {}
        if "field" in context:  # a section's validator about one of its fields (field_error)
            loc.append(context["field"])
        kind = error["type"]
        if kind == "missing" and loc and loc[-1].isdigit():  # a tuple given too few values
            loc, kind = loc[:-1], "too_short"
        key = ".".join(loc) or "<top>"
        if key in problems:  # each member of a union (bool | 'auto') fails on the one value
            continue
        if kind == "extra_forbidden":
            allowed_keys = _allowed_keys(schema, loc[:-1])
            problems[key] = unknown_key_problem(loc, allowed_keys, _key_paths(schema))
            continue
        message = error["msg"].removeprefix("Value error, ")
        value = _lookup(raw, loc)
        # A whole section's dict would bury the one value that is wrong.
        shown = kind != "missing" and not isinstance(value, dict)
        got = f" (got {value!r})" if shown else ""
        allowed = context.get("allowed") or _allowed_values(schema, loc)
        if kind in _SHAPE_ERRORS:
            message, allowed = _SHAPE_ERRORS[kind], _allowed_list(schema, loc, value)
        elif kind == "model_type":  # a value where a section goes (`model.lora: true`)
            keys = _allowed_keys(schema, loc)
            message, allowed = "is a section of keys, not a value", ", ".join(keys)
            if isinstance(value, bool) and "enabled" in keys:
                got = f" (got {value!r}, did you mean '{key}.enabled'?)"
        elif not allowed and kind != "value_error":  # own validators say it themselves
            allowed = _allowed_range(schema, loc, one_bound_said=kind in _BOUND_ERRORS)
        if (kind == "literal_error" or union) and allowed:  # pydantic lists only some of them
            message = "unknown value"
            hint = closest(value, allowed.split(", ")) if isinstance(value, str) else None
            got = f" (got {value!r}, did you mean {hint!r}?)" if hint else got
        suffix = f"; allowed: {allowed}" if allowed and "allowed" not in message else ""
        problems[key] = f"{(flags or {}).get(key, key)}: {message}{got}{suffix}"
    lines = [f"{len(problems)} config error(s):", *(f"  {line}" for line in problems.values())]
    return "\n".join(lines)


def _key_path(schema: type[BaseModel], loc: tuple[str | int, ...]) -> tuple[list[str], bool]:
    """The key path of an error's location (section and field names, list positions), and
    whether pydantic had added a union member's name after the field (`training.resume.bool`,
    `training.resume.literal['auto']`), which is no key of the config and is left out."""
    path: list[str] = []
    section: Any = schema
    for part in loc:
        if isinstance(part, int):
            path.append(str(part))
        elif section is not None:  # a field of this section, or an unknown key
            path.append(part)
            field = section.model_fields.get(part)
            annotation = field.annotation if field is not None else None
            is_section = isinstance(annotation, type) and issubclass(annotation, BaseModel)
            section = annotation if is_section else None
        else:
            return path, True
    return path, False


def _key_paths(schema: type[BaseModel], prefix: str = "") -> list[str]:
    """Every key path of the schema: its sections' fields, and the fields in those."""
    paths = []
    for name, field in schema.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            paths += _key_paths(annotation, f"{prefix}{name}.")
        else:
            paths.append(f"{prefix}{name}")
    return paths


def _allowed_list(schema: type[BaseModel], loc: list[str], value: Any) -> str:
    """ "a list of 2 numbers, e.g. [0.9, 0.95]": what a list or tuple field takes, with its
    default as the example, or the value given made into a list when the default is empty."""
    cls = _section_class(schema, loc[:-1])
    field = cls.model_fields.get(loc[-1]) if cls and loc else None
    if field is None:
        return "a list"
    default = field.get_default(call_default_factory=True)
    items = get_args(field.annotation)
    if get_origin(field.annotation) is tuple and items and Ellipsis not in items:
        kind = "numbers" if all(item in (int, float) for item in items) else "values"
        return f"a list of {len(items)} {kind}, e.g. {list(default)}"
    if default:
        return f"a list, e.g. {list(default)}"
    if value is not None and not isinstance(value, list | tuple | dict):
        return f"a list, e.g. [{value!r}]"
    return "a list"


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
    # A Literal, or a Literal or None (an empty value in the YAML), or a Literal or a bool.
    union = get_origin(field.annotation) in (Union, UnionType)
    parts = get_args(field.annotation) if union else (field.annotation,)
    literals = [part for part in parts if get_origin(part) is Literal]
    optional = type(None) in parts
    boolean = bool in parts
    if not literals or len(literals) + optional + boolean != len(parts):
        return ""
    choices = ["true", "false"] * boolean
    choices += [str(choice) for part in literals for choice in get_args(part)]
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
