"""The OpenAI API's request bodies, validated strictly, and its error body.

Field names, defaults and meanings follow the OpenAI reference (and vLLM's extensions: top_k,
min_p, repetition_penalty, ignore_eos, stop_token_ids...), so any OpenAI client works unchanged.
Validation is strict where the OpenAI API is: a string is not a number, `true` is not 1, and an
unknown field is an error naming it (a typo such as `max_token` would otherwise be ignored
silently and the request run with defaults). Fields that clients send but that change nothing
here (`user`, `metadata`, `parallel_tool_calls`...) are accepted; features this server does not
have (tools, JSON mode, logit_bias, suffix) are refused by name rather than ignored.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from truthgpt.config import InferenceConfig
from truthgpt.errors import RequestError, did_you_mean
from truthgpt.inference.sampling_params import MAX_LOGPROBS, SamplingParams


class APIError(Exception):
    """An error with its HTTP status and the OpenAI error body (`type`, `param`, `code`)."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


class _Strict(BaseModel):
    # allow_inf_nan: Python's json reads NaN and Infinity, which no field here means.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _null_means_not_given(cls, data: Any) -> Any:
        # OpenAI's schema makes every optional field nullable, and clients that send each
        # field send null for the ones they leave unset ("n": null): that is the default.
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {
            key: value
            for key, value in data.items()
            if value is not None or key not in fields or fields[key].is_required()
        }


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(_Strict):
    """What completions and chat share: sampling, stopping, streaming."""

    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    user: str | None = None
    metadata: dict[str, str] | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    top_k: int | None = Field(None, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def check_supported(self) -> None:
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")

    def sampling(
        self,
        max_tokens: int,
        logprobs: int | None,
        defaults: InferenceConfig,
        prompt_logprobs: int | None = None,
    ) -> SamplingParams:
        """The engine's parameters. A field the request leaves out takes the run's own
        `inference:` default (as vLLM takes a model's generation config), so a seeded request
        gives the text that `truthgpt generate` gives; a field given wins."""
        temperature = defaults.temperature if self.temperature is None else self.temperature
        top_k = defaults.top_k if self.top_k is None else self.top_k
        try:
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=defaults.top_p if self.top_p is None else self.top_p,
                top_k=top_k or 0,
                min_p=self.min_p,
                repetition_penalty=self.repetition_penalty,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                seed=self.seed,
                n=self.n,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                stop=() if self.stop is None else self.stop,
                stop_token_ids=tuple(self.stop_token_ids or ()),
                ignore_eos=self.ignore_eos,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
            )
        except RequestError as exc:
            raise APIError(400, str(exc), param=str(exc).split(" ", 1)[0]) from None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    # 0 with echo: score the prompt only (its logprobs), as OpenAI's legacy API allows.
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise APIError(400, "suffix (insertion) is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if self.max_tokens == 0 and not self.echo:
            message = "max_tokens must be >= 1; 0 is allowed only with echo (to score the prompt)"
            raise APIError(400, message, param="max_tokens")

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise APIError(400, "prompt must not be empty", param="prompt")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        return list(prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # Assistant turns from earlier replies carry fields this server never sets: accepted and
    # dropped, since clients send history back as is. Any other field is a typo (`contnet`).
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ResponseFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    reasoning_effort: str | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True

    def check_supported(self) -> None:
        super().check_supported()
        for name in ("tools", "functions"):
            if getattr(self, name):
                raise APIError(400, f"{name} (tool calling) is not supported", param=name)
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            raise APIError(400, "tool calling is not supported", param="tool_choice")
        if self.response_format is not None and self.response_format.type != "text":
            raise APIError(
                400,
                f"response_format {self.response_format.type} is not supported; use text",
                param="response_format",
            )
        if self.top_logprobs and not self.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        both = (self.max_tokens, self.max_completion_tokens)
        if None not in both and both[0] != both[1]:
            raise APIError(
                400,
                f"max_tokens is {both[0]} and max_completion_tokens is {both[1]}: give one "
                "(max_completion_tokens is the current name)",
                param="max_completion_tokens",
            )
        for index, message in enumerate(self.messages):
            # OpenAI's own rule: only an assistant turn (one that called tools) may have none.
            if message.content is None and message.role != "assistant":
                param = f"messages.{index}.content"
                raise APIError(400, f"{param} is required in a {message.role} message", param=param)

    def wanted_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class TokenizeRequest(_Strict):
    """vLLM's /tokenize: a prompt, or chat messages rendered by the chat template (the ids the
    completions or chat route would give the engine)."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    # Unset: true for a prompt, false for messages (the template writes its own BOS).
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    def check_supported(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(400, "give either prompt or messages", param="prompt")


class DetokenizeRequest(_Strict):
    """vLLM's /detokenize: token ids -> text."""

    model: str | None = None
    tokens: list[int]

    def check_supported(self) -> None:
        pass


def parse(model: type[_Strict], body: Any) -> Any:
    """Validate a decoded JSON body; the first problem becomes a 400 naming its field."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    _refuse_parts_not_text(body)
    try:
        request = model.model_validate(body)
    except ValidationError as exc:
        error = _telling_error(exc.errors(), body)
        # Union types add their branch names to the location ("prompt.str"): drop those.
        parts = [str(p) for p in error["loc"] if not _is_type_name(p)]
        param = ".".join(parts) or None
        if error["type"] == "extra_forbidden":
            # A field the object already has is no hint for its unknown neighbour.
            given = _value_at(body, error["loc"][:-1])
            choices = [f for f in _fields_at(model, parts[:-1]) if f not in (given or {})]
            message = f"unknown field {param!r}{did_you_mean(parts[-1], choices)}"
        elif error["type"] == "missing":
            message = f"{param} is required"
        elif error["type"] == "finite_number":
            message = f"{param} must be a finite number (got {error.get('input')!r})"
        else:
            got = error.get("input")
            shown = repr(got) if len(repr(got)) < 80 else repr(got)[:77] + "..."
            shapes = _union_shapes(exc.errors(), error["loc"])
            if error["type"] == "model_type":  # pydantic's text names our class (TextPart)
                message = f"{param} must be an object (got {shown})"
            elif shapes is not None:  # pydantic's text names its first branch only
                message = f"{param} must be {shapes} (got {shown})"
            else:
                message = f"{param}: {error['msg']} (got {shown})"
        raise APIError(400, message, param=param) from None
    request.check_supported()
    return request


# What each branch of a union field takes, in a user's words (pydantic names the branch by type).
_BRANCH_SHAPES = {
    "str": "a string",
    "list[str]": "a list of strings",
    "list[int]": "a list of token ids (integers)",
    "list[list[int]]": "a list of lists of token ids",
    "list[TextPart]": 'a list of parts {"type": "text", "text": ...}',
    "dict[str,any]": "an object",
}


def _union_shapes(errors: list[Any], loc: tuple) -> str | None:
    """What a union field takes ("a string or a list of strings"), when `loc` is its value or an
    item of it: pydantic's message for `"prompt": ["a", 1]` was only its first branch's, "Input
    should be a valid string", although lists are allowed. None for errors deeper inside (a
    content part's keys) and for fields that are not unions."""
    at = next((i for i, part in enumerate(loc) if part in _BRANCH_SHAPES), None)
    if at is None or len(loc) > at + 2:
        return None
    branches = dict.fromkeys(e["loc"][at] for e in errors if e["loc"][:at] == loc[:at])
    shapes = [_BRANCH_SHAPES[branch] for branch in branches if branch in _BRANCH_SHAPES]
    if len(shapes) < 2:
        return None
    return ", ".join(shapes[:-1]) + " or " + shapes[-1]


def _refuse_parts_not_text(body: dict) -> None:
    """A chat content part that is an image, audio or file is valid OpenAI, just not for a
    text model: say so, rather than that its fields are unknown."""
    messages = body.get("messages")
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, part in enumerate(content if isinstance(content, list) else []):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind in ("image_url", "input_image", "input_audio", "file"):
                raise APIError(
                    400,
                    f"messages.{i}.content.{j}: content parts of type {kind!r} are not supported: "
                    "this server runs a text model (parts of type 'text' only)",
                    param=f"messages.{i}.content.{j}.type",
                )


def _telling_error(errors: list[Any], body: dict) -> Any:
    """The error that names the real problem. A union reports every branch it tried, in
    order, so a list of content parts with a typo inside one failed first as "messages.0.content
    should be a valid string" (the str branch), then with the part's own errors. Taken here:
    the deepest error about an object (at one of its keys, or where one was wanted), and of
    those an unknown key before the required one it misspells (`txt` for `text`)."""

    def about_an_object(error: Any) -> bool:
        return error["type"] == "model_type" or isinstance(_value_at(body, error["loc"][:-1]), dict)

    def rank(error: Any) -> tuple[int, bool]:
        depth = sum(1 for part in error["loc"] if not _is_type_name(part))
        return depth, error["type"] == "extra_forbidden"

    return max([e for e in errors if about_an_object(e)] or errors[:1], key=rank)


def _value_at(body: Any, loc: tuple) -> Any:
    """The part of the request body at a validation error's location; None if not there."""
    for part in loc:
        if _is_type_name(part):
            continue
        try:
            body = body[part]
        except (KeyError, IndexError, TypeError):
            return None
    return body


def _fields_at(model: type[BaseModel], parts: list[str]) -> list[str]:
    """The field names of the object at `parts` (list indices skipped): the choices of a
    did-you-mean for an unknown field there."""
    for part in parts:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        nested = _models_in(field.annotation) if field is not None else []
        if not nested:
            return []
        model = nested[0]
    return list(model.model_fields)


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [found for arg in get_args(annotation) for found in _models_in(arg)]


def _is_type_name(part: Any) -> bool:
    return isinstance(part, str) and (
        part in {"str", "int", "float", "bool", "list[str]", "list[int]", "list[list[int]]"}
        or part.startswith(("list[", "function-", "literal[", "dict["))
        or part in {"TextPart", "ChatMessage", "StreamOptions", "ResponseFormat"}
    )
