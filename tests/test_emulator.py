"""The Gemini emulator, driven by the real google-genai SDK (and raw HTTP for its hooks)."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
from google import genai
from google.genai import errors, types

from bot.llm.emulator import (
    Emulator,
    RunningEmulator,
    count_tokens,
    parse_fault,
    running_emulator,
)

MODEL = "gemini-2.5-flash"
#: any retry_options turn off the SDK's silent retry on connection errors (async path)
NO_RETRY = types.HttpRetryOptions(attempts=1)


def make_client(url: str, version: str = "v1beta", timeout_ms: int | None = None) -> genai.Client:
    """A real SDK client on the emulator, without retries."""
    http_options = types.HttpOptions(
        base_url=url, api_version=version, retry_options=NO_RETRY, timeout=timeout_ms
    )
    return genai.Client(api_key="test", http_options=http_options)


def config(
    max_out: int = 1000, budget: int = 0, include_thoughts: bool | None = None
) -> types.GenerateContentConfig:
    """Capped, as the bot asks: cap, thinking budget, no continuation, no AFC."""
    return types.GenerateContentConfig(
        max_output_tokens=max_out,
        thinking_config=types.ThinkingConfig(
            thinking_budget=budget, include_thoughts=include_thoughts
        ),
        automatic_continuation=False,
        automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
    )


def answer_text(resp: types.GenerateContentResponse) -> str:
    """The answer's text, thoughts left out."""
    if not resp.candidates or resp.candidates[0].content is None:
        return ""
    parts = resp.candidates[0].content.parts or []
    return "".join(p.text for p in parts if p.text and not p.thought)


def finish_of(resp: types.GenerateContentResponse) -> str | None:
    if not resp.candidates or resp.candidates[0].finish_reason is None:
        return None
    return resp.candidates[0].finish_reason.value


async def collect(
    client: genai.Client, prompt: str, cfg: types.GenerateContentConfig
) -> list[types.GenerateContentResponse]:
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents=prompt, config=cfg
    )
    return [chunk async for chunk in stream]


@pytest.fixture(scope="module")
async def shared_emu() -> AsyncIterator[RunningEmulator]:
    async with running_emulator() as running:
        yield running


@pytest.fixture(autouse=True)
def emu(shared_emu: RunningEmulator) -> RunningEmulator:
    """The module's emulator, reset to a fast config and no faults for each test."""
    e = shared_emu.emulator
    e.reset()
    e.reseed(0)
    e.ttft_ms, e.chunk_delay_ms, e.words_per_chunk, e.default_words = 0, 0, 5, 24
    return shared_emu


@pytest.fixture(scope="module")
async def client(shared_emu: RunningEmulator) -> AsyncIterator[genai.Client]:
    # one client for the module: making one costs ~60 ms (it loads an SSL context)
    c = make_client(shared_emu.url)
    yield c
    await c.aio.aclose()


@pytest.mark.parametrize("version", ["v1beta", "v1"])
async def test_usage_matches_text(emu: RunningEmulator, version: str) -> None:
    client = make_client(emu.url, version)
    prompt = "What is a satoshi, and why are ecash tokens blinded?"
    try:
        resp = await client.aio.models.generate_content(
            model=MODEL, contents=prompt, config=config()
        )
        counted = await client.aio.models.count_tokens(model=MODEL, contents=prompt)
    finally:
        await client.aio.aclose()
    text = answer_text(resp)
    um = resp.usage_metadata
    assert um is not None
    assert text.startswith("Emulated answer to: What is a satoshi,")
    assert um.prompt_token_count == count_tokens(prompt) == counted.total_tokens
    assert um.candidates_token_count == count_tokens(text) == 24
    assert um.thoughts_token_count is None
    assert um.total_token_count == um.prompt_token_count + um.candidates_token_count
    assert finish_of(resp) == "STOP"
    assert [r.api_version for r in emu.emulator.requests] == [version, version]
    assert [r.rpc for r in emu.emulator.requests] == ["generateContent", "countTokens"]


async def test_answers_are_deterministic_and_stream_matches(client: genai.Client) -> None:
    prompt = "Tell me about Cashu mints"
    first = await client.aio.models.generate_content(model=MODEL, contents=prompt, config=config())
    again = await client.aio.models.generate_content(model=MODEL, contents=prompt, config=config())
    chunks = await collect(client, prompt, config())
    assert answer_text(first) == answer_text(again)
    assert len(chunks) > 1
    assert "".join(answer_text(c) for c in chunks) == answer_text(first)
    # usage grows chunk by chunk; the last chunk has the whole of it and the finish
    counts = [(c.usage_metadata.candidates_token_count or 0) for c in chunks if c.usage_metadata]
    assert counts == sorted(counts)
    assert chunks[-1].usage_metadata == first.usage_metadata
    assert [finish_of(c) for c in chunks] == [None] * (len(chunks) - 1) + ["STOP"]


async def test_max_output_tokens_caps_the_answer(
    client: genai.Client, emu: RunningEmulator
) -> None:
    prompt = "Write a long essay [emulator:words=100]"
    resp = await client.aio.models.generate_content(
        model=MODEL, contents=prompt, config=config(max_out=30)
    )
    chunks = await collect(client, prompt, config(max_out=30))
    for usage, text, finish in [
        (resp.usage_metadata, answer_text(resp), finish_of(resp)),
        (chunks[-1].usage_metadata, "".join(answer_text(c) for c in chunks), finish_of(chunks[-1])),
    ]:
        assert usage is not None
        assert usage.candidates_token_count == count_tokens(text) == 30
        assert finish == "MAX_TOKENS"
    # the same words=100 answer fits a larger cap
    whole = await client.aio.models.generate_content(
        model=MODEL, contents=prompt, config=config(max_out=100)
    )
    assert whole.usage_metadata is not None
    assert whole.usage_metadata.candidates_token_count == 100
    assert finish_of(whole) == "STOP"
    assert [r.max_output_tokens for r in emu.emulator.requests] == [30, 30, 100]


async def test_thinking_counts_within_the_cap(client: genai.Client) -> None:
    long = "Think hard [emulator:words=100]"
    resp = await client.aio.models.generate_content(
        model=MODEL, contents=long, config=config(max_out=50, budget=20)
    )
    um = resp.usage_metadata
    assert um is not None
    assert (um.thoughts_token_count, um.candidates_token_count) == (20, 30)
    assert um.total_token_count == count_tokens(long) + 50
    assert finish_of(resp) == "MAX_TOKENS"
    assert count_tokens(answer_text(resp)) == 30

    # a budget above the cap: thinking eats all of it, no text, no candidates count
    starved = await client.aio.models.generate_content(
        model=MODEL, contents=long, config=config(max_out=50, budget=80)
    )
    assert starved.usage_metadata is not None
    assert starved.usage_metadata.thoughts_token_count == 50
    assert starved.usage_metadata.candidates_token_count is None
    assert answer_text(starved) == ""
    assert finish_of(starved) == "MAX_TOKENS"

    # thoughts come back as text only when asked for, and are not candidates tokens
    shown = await client.aio.models.generate_content(
        model=MODEL, contents="Short one", config=config(budget=16, include_thoughts=True)
    )
    assert shown.candidates and shown.candidates[0].content is not None
    parts = shown.candidates[0].content.parts or []
    assert [bool(p.thought) for p in parts] == [True, False]
    assert shown.usage_metadata is not None
    assert shown.usage_metadata.thoughts_token_count == 16
    assert shown.usage_metadata.candidates_token_count == count_tokens(answer_text(shown)) == 24
    assert finish_of(shown) == "STOP"


async def test_stream_is_not_buffered() -> None:
    # 12 words ("Emulated answer to: Stream please" + 7 filler), 2 per chunk: 6 chunks
    slow = Emulator(ttft_ms=20, chunk_delay_ms=40, words_per_chunk=2, default_words=16)
    async with running_emulator(slow) as emu:
        client = make_client(emu.url)
        try:
            start = time.monotonic()
            stream = await client.aio.models.generate_content_stream(
                model=MODEL, contents="Stream please", config=config()
            )
            arrivals = []
            async for _chunk in stream:
                arrivals.append(time.monotonic() - start)
        finally:
            await client.aio.aclose()
    assert len(arrivals) == 6
    assert arrivals == sorted(arrivals)
    # five 40 ms gaps on the server side (200 ms): a buffered stream would arrive at once
    assert arrivals[-1] - arrivals[0] > 0.1


@pytest.mark.parametrize(
    ("code", "exc_type", "status"),
    [
        (429, errors.ClientError, "RESOURCE_EXHAUSTED"),
        (500, errors.ServerError, "INTERNAL"),
        (503, errors.ServerError, "UNAVAILABLE"),
    ],
)
@pytest.mark.parametrize("stream", [False, True])
async def test_error_directives(
    client: genai.Client, code: int, exc_type: type[errors.APIError], status: str, stream: bool
) -> None:
    prompt = f"Fail please [emulator:error={code}]"
    with pytest.raises(exc_type) as caught:
        if stream:
            await collect(client, prompt, config())
        else:
            await client.aio.models.generate_content(model=MODEL, contents=prompt, config=config())
    assert caught.value.code == code
    assert caught.value.status == status


async def test_dropped_stream_raises_without_final_usage(
    client: genai.Client, emu: RunningEmulator
) -> None:
    stream = await client.aio.models.generate_content_stream(
        model=MODEL, contents="Drop me [emulator:drop-after=2]", config=config()
    )
    got: list[types.GenerateContentResponse] = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async for chunk in stream:
            got.append(chunk)
    assert len(got) == 2
    assert all(finish_of(c) is None for c in got)
    assert got[-1].usage_metadata is not None
    assert (got[-1].usage_metadata.candidates_token_count or 0) < 24
    # the emulator keeps serving after a drop
    ok = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config())
    assert finish_of(ok) == "STOP"
    assert len(emu.emulator.requests) == 2


async def test_dropped_call_raises_once_with_retry_options(
    client: genai.Client, emu: RunningEmulator
) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.aio.models.generate_content(
            model=MODEL, contents="Drop me [emulator:drop-after=0]", config=config()
        )
    assert len(emu.emulator.requests) == 1


async def test_without_retry_options_the_sdk_retries_silently(
    emu: RunningEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the SDK sleeps 1 + random.randint(0, 9) s before its hidden retry: make that 0 s
    monkeypatch.setattr(random, "randint", lambda _a, _b: -1)
    client = genai.Client(
        api_key="test", http_options=types.HttpOptions(base_url=emu.url, api_version="v1beta")
    )
    emu.emulator.queue_fault("drop-after=0")
    try:
        resp = await client.aio.models.generate_content(model=MODEL, contents="Hi", config=config())
    finally:
        await client.aio.aclose()
    assert finish_of(resp) == "STOP"
    assert len(emu.emulator.requests) == 2  # the same request, sent twice


async def test_delay_triggers_client_timeout(emu: RunningEmulator) -> None:
    client = make_client(emu.url, timeout_ms=200)
    try:
        with pytest.raises(TimeoutError):
            await client.aio.models.generate_content(
                model=MODEL, contents="Slow [emulator:delay-ms=3000]", config=config()
            )
    finally:
        await client.aio.aclose()


async def test_safety_block(client: genai.Client) -> None:
    prompt = "Something bad [emulator:block]"
    resp = await client.aio.models.generate_content(model=MODEL, contents=prompt, config=config())
    assert resp.prompt_feedback is not None and resp.prompt_feedback.block_reason is not None
    assert resp.prompt_feedback.block_reason.value == "SAFETY"
    assert not resp.candidates
    um = resp.usage_metadata
    assert um is not None
    assert um.prompt_token_count == count_tokens(prompt) == um.total_token_count
    assert um.candidates_token_count is None

    chunks = await collect(client, "Bad [emulator:block=PROHIBITED_CONTENT]", config())
    assert len(chunks) == 1
    assert chunks[0].prompt_feedback is not None
    assert chunks[0].prompt_feedback.block_reason == types.BlockedReason.PROHIBITED_CONTENT


async def test_safety_stop_mid_answer(client: genai.Client) -> None:
    prompt = "Borderline [emulator:safety-stop]"
    chunks = await collect(client, prompt, config())
    streamed = "".join(answer_text(c) for c in chunks)
    assert streamed  # part of the answer went out before the stop
    assert finish_of(chunks[-1]) == "SAFETY"
    assert answer_text(chunks[-1]) == ""
    assert chunks[-1].usage_metadata is not None
    assert chunks[-1].usage_metadata.candidates_token_count == count_tokens(streamed) == 12

    resp = await client.aio.models.generate_content(model=MODEL, contents=prompt, config=config())
    assert finish_of(resp) == "SAFETY"
    assert answer_text(resp) == ""
    assert resp.usage_metadata is not None
    assert resp.usage_metadata.candidates_token_count == 12


async def test_requests_are_recorded(client: genai.Client, emu: RunningEmulator) -> None:
    cfg = config(max_out=321, budget=7)
    cfg.system_instruction = "Be brief."
    await client.aio.models.generate_content(model=MODEL, contents="Hello", config=cfg)
    (rec,) = emu.emulator.requests
    assert rec.path == f"/v1beta/models/{MODEL}:generateContent"
    assert (rec.rpc, rec.model, rec.api_key) == ("generateContent", MODEL, "test")
    assert rec.max_output_tokens == 321
    # the SDK 3.4.0 sends thinkingConfig's fields in snake_case; the real API takes both
    assert rec.generation_config["thinkingConfig"] == {"thinking_budget": 7}
    assert rec.thinking_budget == 7
    assert rec.body["systemInstruction"]["parts"] == [{"text": "Be brief."}]
    assert rec.headers["x-goog-api-key"] == "test"


async def test_fail_rate_is_seeded(client: genai.Client, emu: RunningEmulator) -> None:
    async def pattern() -> list[bool]:
        failed = []
        for _ in range(16):
            try:
                await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
                failed.append(False)
            except errors.ServerError as exc:
                assert exc.code == 500
                failed.append(True)
        return failed

    emu.emulator.fail_rate = 0.5
    emu.emulator.reseed(7)
    first = await pattern()
    emu.emulator.reseed(7)
    assert await pattern() == first
    assert 0 < sum(first) < len(first)
    emu.emulator.fail_rate = 0.0
    assert not any(await pattern())


async def test_queued_faults_apply_once_each(client: genai.Client, emu: RunningEmulator) -> None:
    emu.emulator.queue_fault("429", "error=503")
    with pytest.raises(errors.ClientError):
        await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
    with pytest.raises(errors.ServerError):
        await collect(client, "x", config())
    assert (
        finish_of(
            await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
        )
        == "STOP"
    )
    assert parse_fault("drop-after=2, delay-ms=5").drop_after == 2
    with pytest.raises(ValueError):
        emu.emulator.queue_fault("explode")


async def test_http_hooks(client: genai.Client, emu: RunningEmulator) -> None:
    async with aiohttp.ClientSession(emu.url) as http:
        async with http.post("/_emulator/faults", json={"next": ["503", "words=3"]}) as r:
            assert r.status == 200
        with pytest.raises(errors.ServerError):
            await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
        short = await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
        assert short.usage_metadata is not None
        assert short.usage_metadata.candidates_token_count == 3
        async with http.get("/_emulator/requests") as r:
            recorded = await r.json()
        assert [x["body"]["generationConfig"]["maxOutputTokens"] for x in recorded] == [1000] * 2
        async with http.delete("/_emulator/requests") as r:
            assert r.status == 200
        assert emu.emulator.requests == []
        async with http.post("/_emulator/config", json={"default_words": 7}) as r:
            assert (await r.json())["default_words"] == 7
        seven = await client.aio.models.generate_content(model=MODEL, contents="x", config=config())
        assert seven.usage_metadata is not None
        assert seven.usage_metadata.candidates_token_count == 7
        async with http.post("/_emulator/faults", json={"fail_rate": 2}) as r:
            assert r.status == 400
        async with http.post("/_emulator/faults", json={"fail_rate": 1}) as r:
            assert (await r.json())["fail_rate"] == 1.0
        with pytest.raises(errors.ServerError):
            await client.aio.models.generate_content(model=MODEL, contents="x", config=config())


async def test_api_key_required(emu: RunningEmulator) -> None:
    body = {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    path = f"/v1beta/models/{MODEL}:generateContent"
    async with aiohttp.ClientSession(emu.url) as http:
        async with http.post(path, json=body) as r:
            assert r.status == 403
            assert (await r.json())["error"]["status"] == "PERMISSION_DENIED"
        async with http.post(path, json=body, params={"key": "k"}) as r:
            assert r.status == 200
            assert (await r.json())["candidates"][0]["finishReason"] == "STOP"
        # the colon may come percent-encoded
        async with http.post(path.replace(":", "%3A"), json=body, params={"key": "k"}) as r:
            assert r.status == 200


async def test_models_and_bad_requests(client: genai.Client) -> None:
    names = [m.name async for m in await client.aio.models.list()]
    assert f"models/{MODEL}" in names
    info = await client.aio.models.get(model=MODEL)
    assert info.output_token_limit == 65536
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model="no-such-model", contents="x")
    assert caught.value.code == 404
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(model=MODEL, contents="[emulator:wrods=3]")
    assert caught.value.code == 400
    with pytest.raises(errors.ClientError) as caught:
        await client.aio.models.generate_content(
            model=MODEL, contents="x", config=config(max_out=70000)
        )
    assert caught.value.code == 400


async def test_command_line() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot.llm.emulator", "--port", "0", "--ttft-ms", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        url = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode().strip()
        assert url.startswith("http://127.0.0.1:")
        client = make_client(url)
        try:
            resp = await client.aio.models.generate_content(model=MODEL, contents="hi")
        finally:
            await client.aio.aclose()
        assert finish_of(resp) == "STOP"
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), 10) == 0
