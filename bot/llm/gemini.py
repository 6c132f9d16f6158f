"""Gemini through the google-genai SDK: one async client per process, hard output caps.

Every call sets ``max_output_tokens`` (thinking included), a ``thinking_budget`` within
it, ``automatic_continuation=False`` (a CONTINUATION finish would make the SDK send the
request again and the output could pass what was paid for), explicit retries and a
timeout. Any failure is one :class:`UpstreamError`: the pipeline refunds it.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal

from google import genai
from google.genai import errors as genai_errors
from google.genai import types

from bot.config import GeminiConfig


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message, in OpenAI's roles."""

    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True, slots=True)
class Usage:
    """Final token usage as Gemini reports it. Output is candidates + thoughts."""

    prompt_tokens: int
    candidates_tokens: int
    thoughts_tokens: int
    finish_reason: str | None

    @property
    def output_tokens(self) -> int:
        """What is billed as output: the answer and the thinking."""
        return self.candidates_tokens + self.thoughts_tokens


@dataclass(frozen=True, slots=True)
class Generation:
    """What to ask: a capped generation."""

    model: str
    messages: Sequence[Message]
    max_output_tokens: int
    thinking_budget: int


class UpstreamError(Exception):
    """The model call failed (HTTP error, timeout, dropped stream, refusal)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class Gemini:
    """The model: streams text deltas, then one final :class:`Usage`."""

    def __init__(self, cfg: GeminiConfig) -> None:
        http_options = types.HttpOptions(
            timeout=int(cfg.timeout_s * 1000),
            retry_options=types.HttpRetryOptions(attempts=cfg.attempts),
        )
        if cfg.base_url:
            http_options.base_url = cfg.base_url
        if cfg.api_version:
            http_options.api_version = cfg.api_version
        self._client = genai.Client(api_key=cfg.api_key, http_options=http_options)
        self.label = "Gemini"

    async def aclose(self) -> None:
        """Close the SDK's HTTP sessions."""
        await self._client.aio.aclose()

    def _config(self, gen: Generation) -> types.GenerateContentConfig:
        system = "\n\n".join(m.content for m in gen.messages if m.role == "system")
        thinking = min(gen.thinking_budget, gen.max_output_tokens)
        return types.GenerateContentConfig(
            max_output_tokens=gen.max_output_tokens,
            thinking_config=types.ThinkingConfig(thinking_budget=thinking),
            automatic_continuation=False,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            system_instruction=system or None,
        )

    @staticmethod
    def _contents(gen: Generation) -> list[types.Content]:
        return [
            types.Content(
                role="model" if m.role == "assistant" else "user",
                parts=[types.Part(text=m.content)],
            )
            for m in gen.messages
            if m.role != "system"
        ]

    async def stream(self, gen: Generation) -> AsyncIterator[str | Usage]:
        """Yield text deltas as they come, then the final usage; raise UpstreamError."""
        usage: Usage | None = None
        chunks: AsyncIterator[types.GenerateContentResponse] | None = None
        try:
            chunks = await self._client.aio.models.generate_content_stream(
                model=gen.model, contents=self._contents(gen), config=self._config(gen)
            )
            async for chunk in chunks:
                _check_blocked(chunk)
                text = _text_of(chunk)
                if text:
                    yield text
                # usage grows chunk by chunk: the last one that has it is the total
                if chunk.usage_metadata is not None:
                    usage = _usage_of(chunk, usage)
        except UpstreamError:
            raise
        except genai_errors.APIError as exc:
            raise UpstreamError(f"model error {exc.code}: {exc.status}", status=exc.code) from exc
        except TimeoutError as exc:
            raise UpstreamError("model timed out") from exc
        except Exception as exc:
            raise UpstreamError(f"model stream failed: {type(exc).__name__}") from exc
        finally:
            # closing the SDK's stream hangs up on the model at once (a cancelled call,
            # e.g. a failed payment on the fast path, must not run on unseen)
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                with contextlib.suppress(Exception):
                    await aclose()
        if usage is None or usage.finish_reason is None:
            raise UpstreamError("model stream ended without a final answer")
        yield usage

    async def generate(self, gen: Generation) -> tuple[str, Usage]:
        """One non-streaming call: the whole text and its usage."""
        try:
            resp = await self._client.aio.models.generate_content(
                model=gen.model, contents=self._contents(gen), config=self._config(gen)
            )
        except genai_errors.APIError as exc:
            raise UpstreamError(f"model error {exc.code}: {exc.status}", status=exc.code) from exc
        except TimeoutError as exc:
            raise UpstreamError("model timed out") from exc
        except Exception as exc:
            raise UpstreamError(f"model call failed: {type(exc).__name__}") from exc
        _check_blocked(resp)
        usage = _usage_of(resp, None)
        if resp.usage_metadata is None or usage.finish_reason is None:
            raise UpstreamError("model answer carried no usage")
        return _text_of(resp), usage


def _check_blocked(resp: types.GenerateContentResponse) -> None:
    fb = resp.prompt_feedback
    if fb is not None and fb.block_reason is not None:
        raise UpstreamError(f"the model refused the question ({fb.block_reason.value})")
    if resp.candidates:
        reason = resp.candidates[0].finish_reason
        if reason is not None and reason.value in _REFUSALS:
            raise UpstreamError(f"the model stopped its answer ({reason.value})")


#: finish reasons that mean "no usable answer": the payer gets a refund
_REFUSALS = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "MALFORMED_FUNCTION_CALL",
    "IMAGE_SAFETY",
}


def _text_of(resp: types.GenerateContentResponse) -> str:
    if not resp.candidates:
        return ""
    content = resp.candidates[0].content
    if content is None or not content.parts:
        return ""
    return "".join(p.text for p in content.parts if p.text and not p.thought)


def _usage_of(resp: types.GenerateContentResponse, prev: Usage | None) -> Usage:
    um = resp.usage_metadata
    finish = None
    if resp.candidates and resp.candidates[0].finish_reason is not None:
        finish = resp.candidates[0].finish_reason.value
    if um is None:
        return prev or Usage(0, 0, 0, finish)
    return Usage(
        prompt_tokens=um.prompt_token_count or 0,
        candidates_tokens=um.candidates_token_count or 0,
        thoughts_tokens=um.thoughts_token_count or 0,
        finish_reason=finish or (prev.finish_reason if prev else None),
    )
