"""A local Gemini REST emulator that the real google-genai SDK can talk to.

It speaks the Gemini Developer API wire format (camelCase JSON, ``usageMetadata``,
``candidates[].content.parts[].text``, ``finishReason``, ``promptFeedback.blockReason``,
Google error JSON, and SSE ``data: {...}\\r\\n\\r\\n`` framing for ``alt=sse``) under
both ``/v1`` and ``/v1beta``:

* ``POST /{v}/models/{model}:generateContent``
* ``POST /{v}/models/{model}:streamGenerateContent?alt=sse``
* ``POST /{v}/models/{model}:countTokens``
* ``GET /{v}/models`` and ``GET /{v}/models/{model}``

plus test hooks for a test in another process (they are not recorded and need no key):

* ``GET /_emulator/requests`` every recorded model API request as JSON
  (:meth:`RecordedRequest.to_json`); ``DELETE`` forgets them
* ``POST /_emulator/faults`` with ``{"fail_rate": 0.1, "seed": 1, "next": ["500",
  "drop-after=2"], "clear": true}`` (all keys optional; ``clear`` drops queued faults and
  zeroes the rate first); ``GET`` shows the state
* ``POST /_emulator/config`` with any of ``ttft_ms``, ``chunk_delay_ms``,
  ``words_per_chunk``, ``default_words``, ``default_thinking_tokens``; ``GET`` shows them

**Tokenizer.** Deterministic: a text costs, for each whitespace-separated word, one token
per started 4 UTF-8 bytes (``"a"`` = 1, ``"hello"`` = 2, ``"satoshis"`` = 2). For ordinary
text that is close to the UTF-8 bytes / 3 estimate. Each non-text part (image, file)
costs 258 tokens, as the real API charges an image. The same function gives
``promptTokenCount``, ``candidatesTokenCount`` and ``countTokens``. The emulated answer is
``"Emulated answer to: <first prompt words>"`` followed by filler words of at most 4 bytes
(1 token each), so an answer of N tokens is exactly N tokens long.

**Output cap.** ``maxOutputTokens`` (default 65536) caps candidates + thoughts, as in the
real API. Thinking uses ``thinkingBudget`` tokens (``-1`` or no budget: the emulator's
``default_thinking_tokens``), at most the cap; the answer gets what is left, and when it
is cut ``finishReason`` is ``MAX_TOKENS``. Thoughts are returned as text (one part with
``thought: true``) only with ``includeThoughts``. Counts that are zero are left out of
``usageMetadata``, as the real API (proto3) does.

**Directives** in the prompt (the last ``contents`` entry and ``systemInstruction``) steer
one generation call (not ``countTokens``, which counts them as text like any other); an
unknown or malformed one is a 400 INVALID_ARGUMENT, so typos show up:

* ``[emulator:words=N]`` answer length in tokens (default ``default_words``)
* ``[emulator:thoughts=N]`` thinking tokens used (at most the budget and the cap)
* ``[emulator:error=CODE]`` answer with that HTTP error in Google's error JSON
* ``[emulator:drop-after=N]`` stream: close the connection abruptly after N chunks (before
  the final chunk at the latest, so there is never a final usage); non-stream: close it
  without any response
* ``[emulator:delay-ms=N]`` sleep before answering (to trigger client timeouts)
* ``[emulator:block]`` / ``[emulator:block=REASON]`` prompt blocked: ``promptFeedback``
  with ``blockReason`` (default SAFETY), no candidates, prompt-only usage
* ``[emulator:safety-stop]`` / ``[emulator:stop=REASON]`` the answer stops half-way with
  that ``finishReason`` (SAFETY for safety-stop); usage counts the tokens made
* ``[emulator:ttft-ms=N]``, ``[emulator:chunk-delay-ms=N]``,
  ``[emulator:words-per-chunk=N]`` timing and chunking of this call

**Faults from tests:** :meth:`Emulator.queue_fault` (same syntax without the brackets, a
bare number meaning ``error=N``; one queued fault per generation call) and
:attr:`Emulator.fail_rate` (a seeded share of generation calls fail with 500). Queued
faults and ``fail_rate`` apply only to ``generateContent`` and ``streamGenerateContent``.

**Timing:** a stream sends its headers at once, its first chunk after ``ttft_ms`` and
each further chunk ``chunk_delay_ms`` later, flushed as it is made. A non-streaming call
takes as long as the matching stream would.

Run it alone with ``python -m bot.llm.emulator --port 8089``; it prints its URL first.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import re
import signal
import sys
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from http import HTTPStatus
from typing import Any, Final

from aiohttp import web

__all__ = [
    "EMULATOR_KEY",
    "Directives",
    "Emulator",
    "RecordedRequest",
    "RunningEmulator",
    "count_tokens",
    "main",
    "parse_fault",
    "running_emulator",
    "start_emulator",
]

#: what the real API says for the statuses tests are likely to inject
_STATUS: Final[dict[int, tuple[str, str]]] = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: ("UNAUTHENTICATED", "Request had invalid authentication credentials."),
    403: ("PERMISSION_DENIED", "The caller does not have permission."),
    404: ("NOT_FOUND", "Requested entity was not found."),
    408: ("DEADLINE_EXCEEDED", "Request timed out."),
    409: ("ABORTED", "The operation was aborted."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.",
    ),
    499: ("CANCELLED", "The operation was cancelled."),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    501: ("UNIMPLEMENTED", "Operation is not implemented, or supported, or enabled."),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}

#: the real API's answer to a call without any API key
_NO_KEY_MESSAGE: Final = (
    "Method doesn't allow unregistered callers (callers without established identity). "
    "Please use API Key or other form of API consumer identity to call this API."
)

_MODEL_LIMIT_IN: Final = 1_048_576
_MODEL_LIMIT_OUT: Final = 65_536
#: what the real API charges for one image; used for every non-text part
_NON_TEXT_PART_TOKENS: Final = 258
_JSON_TYPE: Final = "application/json; charset=UTF-8"
_MODEL_NAME: Final = re.compile(r"^(gemini|gemma)-[a-z0-9.\-]+$")
_DIRECTIVE: Final = re.compile(r"\[emulator:([^\]]*)\]")
_ECHO_WORDS: Final = 8
#: 1 token each (at most 4 bytes), so answer lengths are exact
_FILLER: Final = (
    "sat coin mint note bolt hash key node zap fee swap lock seal blob cash byte bit peer link tip"
).split()
#: models listed by GET /models; any gemini-*/gemma-* name is served
_LISTED_MODELS: Final = (
    "gemini-2.5-flash",
    "gemini-2.5-flash-lite",
    "gemini-2.5-pro",
    "gemini-2.0-flash",
)
#: request headers worth keeping in the record
_HEADERS_OF_INTEREST: Final = (
    "x-goog-api-key",
    "x-goog-api-client",
    "x-server-timeout",
    "user-agent",
    "content-type",
)


def count_tokens(text: str) -> int:
    """Tokens in ``text``: per whitespace-separated word, one per started 4 UTF-8 bytes."""
    return sum(math.ceil(len(word.encode("utf-8")) / 4) for word in text.split())


def _status_of(code: int) -> tuple[str, str]:
    if code in _STATUS:
        return _STATUS[code]
    try:
        phrase = HTTPStatus(code).phrase
    except ValueError:
        phrase = "Error"
    return ("INTERNAL" if code >= 500 else "FAILED_PRECONDITION", phrase)


def _error_body(code: int, message: str | None = None, status: str | None = None) -> bytes:
    default_status, default_message = _status_of(code)
    error: dict[str, Any] = {
        "code": code,
        "message": message or default_message,
        "status": status or default_status,
    }
    if code == 429:
        # the real API tells clients when to come back; some clients read it
        error["details"] = [
            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "1s"}
        ]
    return json.dumps({"error": error}, indent=2).encode("utf-8")


def _error(code: int, message: str | None = None, status: str | None = None) -> web.Response:
    """A response shaped like the real API's errors, which the SDK turns into APIError."""
    return web.Response(
        status=code,
        body=_error_body(code, message, status),
        content_type=None,
        headers={"Content-Type": _JSON_TYPE},
    )


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        body=json.dumps(payload, indent=2).encode("utf-8"),
        headers={"Content-Type": _JSON_TYPE},
    )


class _BadRequest(Exception):
    """The request is invalid: answered with 400 INVALID_ARGUMENT (or ``code``)."""

    def __init__(self, message: str, code: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


@dataclass(frozen=True, slots=True)
class Directives:
    """How one call should behave; ``None`` means "not set" (use the emulator's config)."""

    words: int | None = None
    thoughts: int | None = None
    error: int | None = None
    drop_after: int | None = None
    delay_ms: int | None = None
    block: str | None = None
    stop: str | None = None
    ttft_ms: int | None = None
    chunk_delay_ms: int | None = None
    words_per_chunk: int | None = None

    def merged(self, other: Directives) -> Directives:
        """These directives with every field that ``other`` sets taken from ``other``."""
        changes = {f.name: getattr(other, f.name) for f in fields(other)}
        return replace(self, **{k: v for k, v in changes.items() if v is not None})


_INT_DIRECTIVES: Final = {
    "words": 0,
    "thoughts": 0,
    "drop-after": 0,
    "delay-ms": 0,
    "ttft-ms": 0,
    "chunk-delay-ms": 0,
    "words-per-chunk": 1,
}


def _directive(name: str, value: str | None) -> Directives:
    """One directive, e.g. ``("words", "40")``; raises ValueError on a bad one."""
    if name in _INT_DIRECTIVES:
        if value is None or not value.isdigit() or int(value) < _INT_DIRECTIVES[name]:
            raise ValueError(
                f"emulator directive {name} needs an integer >= "
                f"{_INT_DIRECTIVES[name]}, got {value!r}"
            )
        change: dict[str, Any] = {name.replace("-", "_"): int(value)}
        return replace(Directives(), **change)
    if name == "error":
        if value is None or not value.isdigit() or not 400 <= int(value) <= 599:
            raise ValueError(f"emulator directive error needs a 4xx/5xx code, got {value!r}")
        return Directives(error=int(value))
    if name == "block":
        return Directives(block=(value or "SAFETY").upper())
    if name == "safety-stop" and value is None:
        return Directives(stop="SAFETY")
    if name == "stop" and value:
        return Directives(stop=value.upper())
    raise ValueError(f"unknown emulator directive {name!r}")


def parse_fault(spec: str) -> Directives:
    """Parse a fault spec: ``"500"``, ``"error=429"``, ``"drop-after=2,delay-ms=100"``.

    Items are separated by commas or whitespace and may also be written as in prompts
    (``"[emulator:block]"``); a bare number means ``error=N``. Raises ValueError.
    """
    result = Directives()
    for item in re.split(r"[,\s]+", spec.strip()):
        inner = item.removeprefix("[emulator:").removesuffix("]")
        if not inner:
            continue
        name, sep, value = inner.partition("=")
        if not sep and name.isdigit():
            name, value, sep = "error", name, "="
        result = result.merged(_directive(name.strip().lower(), value if sep else None))
    return result


def _directives_in(text: str) -> Directives:
    result = Directives()
    for match in _DIRECTIVE.finditer(text):
        try:
            result = result.merged(parse_fault(match.group(1)))
        except ValueError as exc:
            raise _BadRequest(str(exc)) from exc
    return result


@dataclass(slots=True)
class RecordedRequest:
    """One HTTP request the emulator received (model API calls only, not test hooks)."""

    http_method: str
    path: str
    #: "generateContent", "streamGenerateContent", "countTokens", "listModels",
    #: "getModel" or "unknown"
    rpc: str
    api_version: str
    model: str | None
    query: dict[str, str]
    headers: dict[str, str]
    api_key: str | None
    body: Any
    received_at: float

    @property
    def generation_config(self) -> dict[str, Any]:
        """The body's ``generationConfig`` (empty if none or if the body is not JSON)."""
        if isinstance(self.body, dict):
            config = _field(self.body, "generationConfig")
            if isinstance(config, dict):
                return config
        return {}

    @property
    def max_output_tokens(self) -> int | None:
        """``generationConfig.maxOutputTokens`` as sent, or None."""
        value = _field(self.generation_config, "maxOutputTokens")
        return value if isinstance(value, int) else None

    @property
    def thinking_budget(self) -> int | None:
        """``generationConfig.thinkingConfig.thinkingBudget`` as sent (either spelling)."""
        thinking = _field(self.generation_config, "thinkingConfig")
        value = _field(thinking, "thinkingBudget") if isinstance(thinking, dict) else None
        return value if isinstance(value, int) else None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict, as served by ``GET /_emulator/requests``."""
        return asdict(self)


@dataclass(frozen=True, slots=True)
class _Plan:
    """What one generation call answers, before timing and faults."""

    model: str
    prompt_tokens: int
    thoughts: int
    thought_text: str | None
    #: the answer's words as made (already cut to the cap, or half-way for a stop)
    words: list[str]
    finish: str
    #: a stop (SAFETY...) hides the answer from a non-streaming response
    stopped: bool


@dataclass(eq=False)
class Emulator:
    """The emulator's config and state: requests received, queued faults, fail rate.

    All attributes may be changed while it runs. ``seed`` seeds the random generator
    behind ``fail_rate``; call :meth:`reseed` to restart its sequence.
    """

    ttft_ms: int = 50
    chunk_delay_ms: int = 10
    words_per_chunk: int = 8
    default_words: int = 40
    #: thinking tokens used when the request sets no budget or -1 (dynamic)
    default_thinking_tokens: int = 0
    seed: int = 0
    fail_rate: float = 0.0
    requests: list[RecordedRequest] = field(default_factory=list)
    #: streams the client hung up on before their end (e.g. it cancelled the call)
    streams_cut: int = 0

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._faults: deque[Directives] = deque()
        self._ids = 0

    # -- test hooks ---------------------------------------------------------------

    def reseed(self, seed: int | None = None) -> None:
        """Restart the ``fail_rate`` random sequence (from ``seed`` if given)."""
        if seed is not None:
            self.seed = seed
        self._rng = random.Random(self.seed)

    def queue_fault(self, *specs: str | Directives) -> None:
        """Make the next generation calls fail, one spec per call, in order.

        A spec is a :class:`Directives` or a string for :func:`parse_fault`, e.g.
        ``"429"``, ``"drop-after=2"``, ``"delay-ms=5000"``, ``"block"``. It overrides
        the directives in that call's prompt. Raises ValueError on a bad spec.
        """
        parsed = [s if isinstance(s, Directives) else parse_fault(s) for s in specs]
        self._faults.extend(parsed)

    @property
    def queued_faults(self) -> list[Directives]:
        """Faults still waiting for a call."""
        return list(self._faults)

    def clear_faults(self) -> None:
        """Drop queued faults and set ``fail_rate`` to 0."""
        self._faults.clear()
        self.fail_rate = 0.0

    def reset(self) -> None:
        """Forget recorded requests and faults (config stays)."""
        self.requests.clear()
        self.clear_faults()

    def calls(self, rpc: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, optionally only one rpc (e.g. ``"streamGenerateContent"``)."""
        return [r for r in self.requests if rpc is None or r.rpc == rpc]

    # -- the web application --------------------------------------------------------

    def app(self) -> web.Application:
        """A new aiohttp application serving this emulator."""
        app = web.Application(client_max_size=64 * 1024 * 1024)
        app[EMULATOR_KEY] = self
        version = "{version:v1|v1beta}"
        app.router.add_get(f"/{version}/models", self._list_models)
        app.router.add_get(f"/{version}/models/{{rest:.+}}", self._get_model)
        app.router.add_post(f"/{version}/models/{{rest:.+}}", self._model_rpc)
        app.router.add_get("/_emulator/requests", self._hook_requests)
        app.router.add_delete("/_emulator/requests", self._hook_clear_requests)
        app.router.add_get("/_emulator/faults", self._hook_faults)
        app.router.add_post("/_emulator/faults", self._hook_faults)
        app.router.add_get("/_emulator/config", self._hook_config)
        app.router.add_post("/_emulator/config", self._hook_config)
        return app

    async def _record(self, request: web.Request, rpc: str, model: str | None) -> RecordedRequest:
        body: Any = None
        if request.can_read_body:
            raw = await request.read()
            try:
                body = json.loads(raw)
            except ValueError:
                body = raw.decode("utf-8", errors="replace")
        headers = {h: request.headers[h] for h in _HEADERS_OF_INTEREST if h in request.headers}
        key = request.headers.get("x-goog-api-key") or request.query.get("key") or None
        record = RecordedRequest(
            http_method=request.method,
            path=request.path,
            rpc=rpc,
            api_version=request.match_info.get("version", ""),
            model=model,
            query=dict(request.query),
            headers=headers,
            api_key=key,
            body=body,
            received_at=time.time(),
        )
        self.requests.append(record)
        return record

    @staticmethod
    def _split_rest(rest: str) -> tuple[str, str | None]:
        """``"models/gemini-2.5-flash:generateContent"`` -> (model, method)."""
        # the colon may arrive percent-encoded; aiohttp decodes it, but be safe
        rest = rest.replace("%3A", ":").replace("%3a", ":")
        model, sep, method = rest.rpartition(":")
        if not sep:
            model, method = rest, ""
        while model.startswith("models/"):
            model = model.removeprefix("models/")
        return model, method or None

    async def _model_rpc(self, request: web.Request) -> web.StreamResponse:
        model, method = self._split_rest(request.match_info["rest"])
        rpc = (
            method
            if method in ("generateContent", "streamGenerateContent", "countTokens")
            else None
        )
        record = await self._record(request, rpc or "unknown", model)
        if record.api_key is None:
            return _error(403, _NO_KEY_MESSAGE)
        if rpc is None:
            return _error(404, f"Method {method!r} is not supported by the emulator.")
        if not _MODEL_NAME.match(model):
            return _model_not_found(model, record.api_version, rpc)
        try:
            body = _body_dict(record.body)
            if rpc == "countTokens":
                return _json(_count_response(body))
            return await self._generate(request, model, body, stream=rpc != "generateContent")
        except _BadRequest as exc:
            return _error(exc.code, exc.message)

    async def _list_models(self, request: web.Request) -> web.StreamResponse:
        record = await self._record(request, "listModels", None)
        if record.api_key is None:
            return _error(403, _NO_KEY_MESSAGE)
        return _json({"models": [_model_info(m) for m in _LISTED_MODELS]})

    async def _get_model(self, request: web.Request) -> web.StreamResponse:
        model, method = self._split_rest(request.match_info["rest"])
        record = await self._record(request, "getModel", model)
        if record.api_key is None:
            return _error(403, _NO_KEY_MESSAGE)
        if method is not None or not _MODEL_NAME.match(model):
            return _model_not_found(model, record.api_version, "get")
        return _json(_model_info(model))

    # -- generation -----------------------------------------------------------------

    def _next_fault(self) -> Directives:
        if self._faults:
            return self._faults.popleft()
        # draw only when a rate is set, so the sequence starts at the seed when enabled
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            return Directives(error=500)
        return Directives()

    def _plan(self, model: str, body: dict[str, Any], d: Directives) -> _Plan:
        prompt_tokens = _prompt_tokens(body)
        if prompt_tokens > _MODEL_LIMIT_IN:
            raise _BadRequest(
                f"The input token count ({prompt_tokens}) exceeds the maximum number of "
                f"tokens allowed ({_MODEL_LIMIT_IN})."
            )
        config = _field(body, "generationConfig") or {}
        if not isinstance(config, dict):
            raise _BadRequest("Invalid value at 'generation_config'.")
        cap = _int_field(config, "maxOutputTokens", _MODEL_LIMIT_OUT)
        if not 1 <= cap <= _MODEL_LIMIT_OUT:
            raise _BadRequest(
                f"Unable to submit request because it has a maxOutputTokens value of {cap} "
                f"but the supported range is from 1 (inclusive) to {_MODEL_LIMIT_OUT + 1} "
                "(exclusive). Update the value and try again."
            )
        thinking = _field(config, "thinkingConfig") or {}
        if not isinstance(thinking, dict):
            raise _BadRequest("Invalid value at 'generation_config.thinking_config'.")
        budget = _int_field(thinking, "thinkingBudget", -1)
        if budget < -1:
            raise _BadRequest(f"The thinking budget {budget} is invalid.")
        wanted_thoughts = self.default_thinking_tokens if budget == -1 else budget
        if d.thoughts is not None:
            wanted_thoughts = d.thoughts if budget == -1 else min(d.thoughts, budget)
        thoughts = min(wanted_thoughts, cap)

        answer = _answer_words(_last_text(body), self.default_words if d.words is None else d.words)
        room = cap - thoughts
        words: list[str] = []
        used = 0
        for word in answer:
            cost = count_tokens(word)
            if used + cost > room:
                break
            words.append(word)
            used += cost
        finish = "STOP" if len(words) == len(answer) else "MAX_TOKENS"
        stopped = False
        if d.stop is not None:
            # stop half-way through the answer's tokens
            half, words, used = used // 2, [], 0
            for word in answer:
                if used + count_tokens(word) > half:
                    break
                words.append(word)
                used += count_tokens(word)
            finish, stopped = d.stop, True
        thought_text = None
        if thoughts > 0 and bool(_field(thinking, "includeThoughts")):
            thought_text = f"**Thinking it over**\n\nThe user asks: {' '.join(answer[4:9])}"
        return _Plan(model, prompt_tokens, thoughts, thought_text, words, finish, stopped)

    async def _generate(
        self, request: web.Request, model: str, body: dict[str, Any], *, stream: bool
    ) -> web.StreamResponse:
        d = _directives_in(_directive_text(body)).merged(self._next_fault())
        if d.delay_ms:
            await asyncio.sleep(d.delay_ms / 1000)
        if d.error is not None:
            return _error(d.error)
        if d.drop_after is not None and not stream:
            return await _drop(request, None)
        plan = self._plan(model, body, d)
        self._ids += 1
        rid = f"emu{self._ids:08d}"
        if d.block is not None:
            blocked = {
                "promptFeedback": {"blockReason": d.block, "safetyRatings": _RATINGS_BLOCKED},
                "usageMetadata": _usage(plan.prompt_tokens, 0, 0),
                "modelVersion": model,
                "responseId": rid,
            }
            if stream:
                return await self._stream(request, [blocked], d)
            return _json(blocked)
        chunks = _chunks(plan, rid, d.words_per_chunk or self.words_per_chunk)
        if stream:
            return await self._stream(request, chunks, d)
        ttft = self.ttft_ms if d.ttft_ms is None else d.ttft_ms
        delay = self.chunk_delay_ms if d.chunk_delay_ms is None else d.chunk_delay_ms
        # a whole answer takes as long as streaming it would
        await asyncio.sleep((ttft + delay * (len(chunks) - 1)) / 1000)
        return _json(_whole(plan, rid))

    async def _stream(
        self, request: web.Request, chunks: list[dict[str, Any]], d: Directives
    ) -> web.StreamResponse:
        ttft = self.ttft_ms if d.ttft_ms is None else d.ttft_ms
        delay = self.chunk_delay_ms if d.chunk_delay_ms is None else d.chunk_delay_ms
        response = web.StreamResponse(
            status=200,
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Content-Type-Options": "nosniff",
            },
        )
        # a drop always comes before the final chunk, so a dropped stream has no final usage
        drop_at = None if d.drop_after is None else min(d.drop_after, len(chunks) - 1)
        try:
            await response.prepare(request)
            for i, chunk in enumerate(chunks):
                await asyncio.sleep((ttft if i == 0 else delay) / 1000)
                if i == drop_at:
                    return await _drop(request, response)
                data = json.dumps(chunk, separators=(",", ":")).encode("utf-8")
                # each write goes to the socket at once: chunks are not buffered
                await response.write(b"data: " + data + b"\r\n\r\n")
            await response.write_eof()
        except ConnectionResetError:
            # the client hung up (e.g. it cancelled the stream): nothing left to send to
            self.streams_cut += 1
        except asyncio.CancelledError:
            # the same, noticed by aiohttp first: it cancels the handler
            self.streams_cut += 1
            raise
        return response

    # -- test hooks over HTTP -------------------------------------------------------

    async def _hook_requests(self, request: web.Request) -> web.StreamResponse:
        return _json([r.to_json() for r in self.requests])

    async def _hook_clear_requests(self, request: web.Request) -> web.StreamResponse:
        self.requests.clear()
        return _json({"cleared": True})

    async def _hook_faults(self, request: web.Request) -> web.StreamResponse:
        if request.method == "POST":
            try:
                payload = await request.json()
                if not isinstance(payload, dict):
                    raise ValueError("expected a JSON object")
                if payload.get("clear"):
                    self.clear_faults()
                if "seed" in payload:
                    self.reseed(int(payload["seed"]))
                if "fail_rate" in payload:
                    rate = float(payload["fail_rate"])
                    if not 0.0 <= rate <= 1.0:
                        raise ValueError("fail_rate must be within [0, 1]")
                    self.fail_rate = rate
                nxt = payload.get("next", [])
                if not isinstance(nxt, list):
                    raise ValueError("next must be a list of fault specs")
                self.queue_fault(*(str(s) for s in nxt))
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc))
        return _json(
            {
                "fail_rate": self.fail_rate,
                "seed": self.seed,
                "next": [asdict(f) for f in self._faults],
            }
        )

    async def _hook_config(self, request: web.Request) -> web.StreamResponse:
        names = (
            "ttft_ms",
            "chunk_delay_ms",
            "words_per_chunk",
            "default_words",
            "default_thinking_tokens",
        )
        if request.method == "POST":
            try:
                payload = await request.json()
                if not isinstance(payload, dict) or set(payload) - set(names):
                    raise ValueError(f"expected a JSON object with keys among {names}")
                values = {k: int(v) for k, v in payload.items()}
                if any(v < 0 for v in values.values()) or values.get("words_per_chunk") == 0:
                    raise ValueError("values must be >= 0 (words_per_chunk >= 1)")
            except (ValueError, TypeError) as exc:
                return _error(400, str(exc))
            for k, v in values.items():
                setattr(self, k, v)
        return _json({k: getattr(self, k) for k in names})


#: ``app[EMULATOR_KEY]`` is the Emulator an application serves
EMULATOR_KEY: Final = web.AppKey("emulator", Emulator)

_RATINGS_BLOCKED: Final = [
    {"category": "HARM_CATEGORY_SEXUALLY_EXPLICIT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_HARASSMENT", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
]


async def _drop(request: web.Request, response: web.StreamResponse | None) -> web.StreamResponse:
    """Close the connection at once: no response, or a chunked body that never ends."""
    transport = request.transport
    if transport is not None:
        transport.abort()
    # the client is gone; what aiohttp does with this response is never seen
    return response if response is not None else web.Response(status=500)


def _body_dict(body: Any) -> dict[str, Any]:
    if isinstance(body, dict):
        return body
    if body is None:
        raise _BadRequest("The request has no body.")
    raise _BadRequest(
        f"Invalid JSON payload received. Unknown name or bad value: {str(body)[:80]!r}"
    )


def _snake(name: str) -> str:
    return re.sub(r"[A-Z]", lambda m: "_" + m.group(0).lower(), name)


def _field(obj: dict[str, Any], camel: str) -> Any:
    """A field by its JSON (lowerCamelCase) name or its proto (snake_case) name.

    The real API accepts both, as proto3 JSON does, and the SDK really sends both: in
    3.4.0 ``generationConfig.thinkingConfig`` arrives as ``{"thinking_budget": N}``.
    """
    value = obj.get(camel)
    return obj.get(_snake(camel)) if value is None else value


def _int_field(obj: dict[str, Any], name: str, default: int) -> int:
    value = _field(obj, name)
    if value is None:
        return default
    # the real API takes int64 fields as JSON numbers or strings
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _BadRequest(f"Invalid value at '{name}' (TYPE_INT32), {value!r}")
    return value


def _parts(content: Any) -> list[dict[str, Any]]:
    if not isinstance(content, dict):
        return []
    parts = content.get("parts")
    return [p for p in parts if isinstance(p, dict)] if isinstance(parts, list) else []


def _contents(body: dict[str, Any]) -> list[Any]:
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        raise _BadRequest("* GenerateContentRequest.contents: contents is not specified\n")
    return contents


def _part_tokens(part: dict[str, Any]) -> int:
    if isinstance(part.get("text"), str):
        return count_tokens(part["text"])
    if _field(part, "inlineData") is not None or _field(part, "fileData") is not None:
        return _NON_TEXT_PART_TOKENS
    return count_tokens(json.dumps(part))


def _prompt_tokens(body: dict[str, Any]) -> int:
    total = sum(_part_tokens(p) for c in _contents(body) for p in _parts(c))
    return total + sum(_part_tokens(p) for p in _parts(_field(body, "systemInstruction")))


def _text_of(content: Any) -> str:
    return " ".join(p["text"] for p in _parts(content) if isinstance(p.get("text"), str))


def _last_text(body: dict[str, Any]) -> str:
    return _text_of(_contents(body)[-1])


def _directive_text(body: dict[str, Any]) -> str:
    return _text_of(_field(body, "systemInstruction")) + " " + _last_text(body)


def _answer_words(prompt: str, length: int) -> list[str]:
    """Exactly ``length`` tokens of answer, derived from the prompt only."""
    echo = _DIRECTIVE.sub(" ", prompt).split()[:_ECHO_WORDS]
    words: list[str] = []
    used = 0
    for word in ["Emulated", "answer", "to:", *echo]:
        if used + count_tokens(word) > length:
            break
        words.append(word)
        used += count_tokens(word)
    # where the filler starts depends on the prompt, so answers differ between prompts
    start = zlib.crc32(prompt.encode("utf-8"))
    words.extend(_FILLER[(start + i) % len(_FILLER)] for i in range(length - used))
    return words


def _usage(prompt: int, candidates: int, thoughts: int) -> dict[str, Any]:
    usage: dict[str, Any] = {"promptTokenCount": prompt}
    if candidates:
        usage["candidatesTokenCount"] = candidates
    usage["totalTokenCount"] = prompt + candidates + thoughts
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if thoughts:
        usage["thoughtsTokenCount"] = thoughts
    return usage


def _candidate(parts: list[dict[str, Any]], finish: str | None) -> dict[str, Any]:
    candidate: dict[str, Any] = {}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    if finish is not None:
        candidate["finishReason"] = finish
        if finish == "SAFETY":
            candidate["safetyRatings"] = _RATINGS_BLOCKED
    candidate["index"] = 0
    return candidate


def _whole(plan: _Plan, rid: str) -> dict[str, Any]:
    """The non-streaming response."""
    parts: list[dict[str, Any]] = []
    if plan.thought_text is not None:
        parts.append({"text": plan.thought_text, "thought": True})
    if plan.words and not plan.stopped:
        parts.append({"text": " ".join(plan.words)})
    made = count_tokens(" ".join(plan.words))
    return {
        "candidates": [_candidate(parts, plan.finish)],
        "usageMetadata": _usage(plan.prompt_tokens, made, plan.thoughts),
        "modelVersion": plan.model,
        "responseId": rid,
    }


def _chunks(plan: _Plan, rid: str, per_chunk: int) -> list[dict[str, Any]]:
    """The stream's chunks: text in order, growing usage, the finish on the last one."""
    texts: list[tuple[dict[str, Any], int]] = []
    if plan.thought_text is not None:
        texts.append(({"text": plan.thought_text, "thought": True}, 0))
    for i in range(0, len(plan.words), per_chunk):
        group = plan.words[i : i + per_chunk]
        text = (" " if i else "") + " ".join(group)
        texts.append(({"text": text}, count_tokens(text)))
    if plan.stopped or not texts:
        # a stopped answer ends with a chunk without content, as the real API sends it
        texts.append(({}, 0))
    chunks: list[dict[str, Any]] = []
    made = 0
    for i, (part, tokens) in enumerate(texts):
        made += tokens
        last = i == len(texts) - 1
        chunks.append(
            {
                "candidates": [_candidate([part] if part else [], plan.finish if last else None)],
                "usageMetadata": _usage(plan.prompt_tokens, made, plan.thoughts),
                "modelVersion": plan.model,
                "responseId": rid,
            }
        )
    return chunks


def _count_response(body: dict[str, Any]) -> dict[str, Any]:
    # countTokens takes either `contents` or a whole `generateContentRequest`
    inner = _field(body, "generateContentRequest")
    tokens = _prompt_tokens(inner if isinstance(inner, dict) else body)
    return {
        "totalTokens": tokens,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}],
    }


def _model_info(model: str) -> dict[str, Any]:
    display = " ".join(w.capitalize() for w in model.replace("-", " ").split())
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": display,
        "description": f"{display}, emulated locally.",
        "inputTokenLimit": _MODEL_LIMIT_IN,
        "outputTokenLimit": _MODEL_LIMIT_OUT,
        "supportedGenerationMethods": ["generateContent", "countTokens"],
        "temperature": 1,
        "topP": 0.95,
        "topK": 64,
        "maxTemperature": 2,
        "thinking": True,
    }


def _model_not_found(model: str, version: str, rpc: str) -> web.Response:
    return _error(
        404,
        f"models/{model} is not found for API version {version}, or is not supported "
        f"for {rpc}. Call ListModels to see the list of available models and their "
        "supported methods.",
    )


@dataclass(eq=False)
class RunningEmulator:
    """An emulator listening on a socket. ``async with`` stops it on exit."""

    emulator: Emulator
    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        """Base URL for ``HttpOptions(base_url=...)``, e.g. ``http://127.0.0.1:8089``."""
        return f"http://{self.host}:{self.port}"

    async def stop(self) -> None:
        """Stop listening and end open connections (in-flight calls are cancelled)."""
        await self.runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


async def start_emulator(
    emulator: Emulator | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningEmulator:
    """Serve ``emulator`` (a new default one if None) on ``host:port``; 0 = a free port."""
    emu = emulator if emulator is not None else Emulator()
    # handler_cancellation: a client that hangs up stops its call, as upstream does;
    # a short shutdown_timeout: stop() must not wait for a long delay-ms sleep
    runner = web.AppRunner(
        emu.app(), handler_cancellation=True, shutdown_timeout=0.5, access_log=None
    )
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = int(runner.addresses[0][1])
    return RunningEmulator(emulator=emu, runner=runner, host=host, port=bound_port)


@contextlib.asynccontextmanager
async def running_emulator(
    emulator: Emulator | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningEmulator]:
    """``async with running_emulator() as emu:`` serve for the duration of the block."""
    running = await start_emulator(emulator, host, port)
    try:
        yield running
    finally:
        await running.stop()


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bot.llm.emulator",
        description="A local Gemini REST emulator. Prints its base URL on the first line.",
    )
    defaults = Emulator()
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089, help="0 picks a free port")
    parser.add_argument("--ttft-ms", type=int, default=defaults.ttft_ms)
    parser.add_argument("--chunk-delay-ms", type=int, default=defaults.chunk_delay_ms)
    parser.add_argument("--words-per-chunk", type=int, default=defaults.words_per_chunk)
    parser.add_argument("--default-words", type=int, default=defaults.default_words)
    parser.add_argument(
        "--default-thinking-tokens", type=int, default=defaults.default_thinking_tokens
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--fail-rate", type=float, default=defaults.fail_rate)
    args = parser.parse_args(argv)
    if args.words_per_chunk < 1 or not 0.0 <= args.fail_rate <= 1.0:
        parser.error("--words-per-chunk must be >= 1 and --fail-rate within [0, 1]")
    return args


async def _serve(args: argparse.Namespace) -> None:
    emulator = Emulator(
        ttft_ms=args.ttft_ms,
        chunk_delay_ms=args.chunk_delay_ms,
        words_per_chunk=args.words_per_chunk,
        default_words=args.default_words,
        default_thinking_tokens=args.default_thinking_tokens,
        seed=args.seed,
        fail_rate=args.fail_rate,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running_emulator(emulator, args.host, args.port) as running:
        # the URL first and flushed: a parent process reads it to learn the port
        print(running.url, flush=True)
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the emulator until SIGINT/SIGTERM (``python -m bot.llm.emulator --port N``)."""
    args = _parse_args(argv)
    asyncio.run(_serve(args))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
