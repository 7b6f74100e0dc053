"""Typed models of exactly what `sitegen explain` reads from an OpenAI-compatible endpoint's
answers. An answer of the wrong shape (a list body, numeric content, a string usage, a logprob of
1e308 or a string, a list where a dict of top logprobs belongs) fails validation here, and the
caller turns that into a failure of the one neuron being explained, never a traceback.

Strict (no "12" -> 12 coercion), unknown fields ignored (servers add their own)."""

from __future__ import annotations

from typing import Annotated, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# A log-probability: finite and <= 0, up to float rounding in servers that compute a log-softmax.
Logprob = Annotated[float, Field(allow_inf_nan=False, le=1e-6)]
Count = Annotated[int, Field(ge=0)]


class _Answer(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)


class Usage(_Answer):
    prompt_tokens: Optional[Count] = None
    completion_tokens: Optional[Count] = None


class Message(_Answer):
    content: Optional[str] = None  # null: an empty answer (OpenAI sends null with a refusal or a tool call)


class ChatChoice(_Answer):
    message: Message


class ChatAnswer(_Answer):
    """/v1/chat/completions: choices[0].message.content and usage."""

    choices: list[ChatChoice] = Field(min_length=1)
    usage: Optional[Usage] = None


class EchoLogprobs(_Answer):
    """The `logprobs` object of a /v1/completions answer with echo: one entry per echoed token. A
    field a server leaves out means it gives no usable logprobs (the logprob-free fallback); a
    field it sends must have the right type and the four lists the same length."""

    tokens: Optional[list[str]] = None
    token_logprobs: Optional[list[Optional[Logprob]]] = None
    top_logprobs: Optional[list[Optional[dict[str, Logprob]]]] = None
    text_offset: Optional[list[Count]] = None

    @model_validator(mode="after")
    def _same_length(self):
        lengths = {
            len(v) for v in (self.tokens, self.token_logprobs, self.top_logprobs, self.text_offset) if v is not None
        }
        if len(lengths) > 1:
            raise ValueError(
                f"tokens, token_logprobs, top_logprobs and text_offset differ in length ({', '.join(map(str, sorted(lengths)))})"
            )
        return self

    @property
    def usable(self) -> bool:
        """Whether the answer holds what the all-at-once simulation reads."""
        return bool(self.tokens and self.top_logprobs and self.text_offset)


class CompletionChoice(_Answer):
    logprobs: Optional[EchoLogprobs] = None


class CompletionAnswer(_Answer):
    """/v1/completions with echo + logprobs: choices[0].logprobs and usage."""

    choices: list[CompletionChoice] = Field(min_length=1)
    usage: Optional[Usage] = None


def problem(model: type[_Answer], answer: object) -> tuple[_Answer | None, str | None]:
    """(the answer read as `model`, None), or (None, one line saying what is wrong where)."""
    try:
        return model.model_validate(answer), None
    except ValidationError as e:
        err = e.errors(include_url=False, include_input=False)[0]
        where = ".".join(str(part) for part in err["loc"]) or "the body"
        more = f" (and {e.error_count() - 1} more)" if e.error_count() > 1 else ""
        return None, f"{where}: {err['msg']}{more}"
