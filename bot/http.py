"""The HTTP transport: an OpenAI-compatible API paid per request with Cashu (NUT-24).

``POST /v1/chat/completions`` with ``X-Cashu: cashuB...``. Without a token, or with too
little: 402 and ``X-Cashu: creqA...`` (a NUT-18 payment request). On success the change
comes back in the ``X-Cashu`` response header and in the body's ``payment`` object; a
streamed answer carries it in its final chunk. A 402 also offers a Lightning invoice
(``error.lightning``): pay it and send its quote id in ``X-Cashu-Quote`` instead of a token.
This module only translates HTTP to and from the pipeline.
"""

from __future__ import annotations

import hmac
import json
import logging
import math
import time
from typing import Any

from aiohttp import web

from bot.config import Config
from bot.dashboard import DashboardView
from bot.errors import BadRequest, PaymentError, PaymentRequired, RateLimited
from bot.llm.gemini import Message
from bot.pipeline import (
    Answer,
    ChatRequest,
    Finished,
    Pipeline,
    QuotePayment,
    Receipt,
    parse_token_or_none,
)
from bot.state import StateUnavailable
from mint_client.store import InvoiceRecord

log = logging.getLogger("ecashbot.http")

PIPELINE = web.AppKey("pipeline", Pipeline)
CONFIG = web.AppKey("config", Config)

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_request_from_openai(body: Any) -> ChatRequest:
    """Read an OpenAI chat-completions body. Raises BadRequest with what is wrong."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    raw = body.get("messages")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'messages' must be a non-empty list")
    messages: list[Message] = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise BadRequest(f"messages[{i}] must be an object")
        role = _ROLES.get(str(m.get("role")))
        if role is None:
            raise BadRequest(f"messages[{i}].role must be system, user or assistant")
        content = m.get("content")
        if isinstance(content, list):
            texts = [
                p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"
            ]
            if len(texts) != len(content) or not all(isinstance(t, str) for t in texts):
                raise BadRequest(f"messages[{i}].content: only text parts are supported")
            content = "\n".join(t for t in texts if isinstance(t, str))
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string")
        messages.append(Message(role=role, content=content))  # type: ignore[arg-type]
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("'model' must be a string")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None and (
        not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens <= 0
    ):
        raise BadRequest("'max_tokens' must be a positive integer")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false")
    return ChatRequest(messages=tuple(messages), model=model, max_tokens=max_tokens, stream=stream)


def payment_json(receipt: Receipt) -> dict[str, Any]:
    """The ``payment`` object of a response: where every sat went."""
    s = receipt.settlement
    return {
        "paid_sat": s.paid_sat,
        "fee_sat": s.fee_sat,
        "cost_msat": s.cost_msat,
        "charged_sat": s.charged_sat,
        "change_sat": s.change_sat,
        "change": receipt.change_token,
        "refunded": receipt.refunded,
        "request_id": receipt.request_id,
    }


def usage_json(receipt: Receipt) -> dict[str, Any]:
    """OpenAI ``usage`` from the settled token counts."""
    s = receipt.settlement
    u = receipt.usage
    return {
        "prompt_tokens": s.input_tokens,
        "completion_tokens": s.output_tokens,
        "total_tokens": s.input_tokens + s.output_tokens,
        "completion_tokens_details": {"reasoning_tokens": u.thoughts_tokens if u else 0},
    }


def _finish_reason(receipt: Receipt) -> str:
    u = receipt.usage
    return "length" if u is not None and u.finish_reason == "MAX_TOKENS" else "stop"


def error_response(
    exc: PaymentError, request_id: str | None = None, invoice: InvoiceRecord | None = None
) -> web.Response:
    """The one mapping of a PaymentError to an HTTP response (a 402 may carry an invoice)."""
    err: dict[str, Any] = {
        "message": exc.message,
        "type": exc.code,
        "code": exc.code,
        "token_untouched": exc.token_untouched,
    }
    headers: dict[str, str] = {}
    if isinstance(exc, PaymentRequired):
        err["amount_sat"] = exc.amount_sat
        err["payment_request"] = exc.payment_request
        headers["X-Cashu"] = exc.payment_request
        if invoice is not None:
            err["lightning"] = invoice_json(invoice)
    if isinstance(exc, RateLimited):
        err["retry_after_s"] = exc.retry_after_s
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    if request_id:
        headers["X-Request-Id"] = request_id
    return web.json_response({"error": err}, status=exc.http_status, headers=headers)


def invoice_json(invoice: InvoiceRecord) -> dict[str, Any]:
    """How to pay by Lightning instead: pay ``invoice``, then send ``X-Cashu-Quote: quote``."""
    return {
        "invoice": invoice.request,
        "quote": invoice.quote_id,
        "amount_sat": invoice.amount_sat,
        "expiry": invoice.expiry,
        "mint": invoice.mint,
        "header": "X-Cashu-Quote",
    }


async def _offer_invoice(pipeline: Pipeline, exc: PaymentError) -> InvoiceRecord | None:
    if not isinstance(exc, PaymentRequired):
        return None
    try:
        return await pipeline.invoice(exc.amount_sat, transport="http")
    except PaymentError:
        return None


def client_address(request: web.Request) -> str:
    """The payer's address for rate limits: the socket peer, or the trusted proxy's header."""
    header = request.app[CONFIG].http.trusted_proxy_header
    if header:
        value = request.headers.get(header, "")
        first = value.split(",")[0].strip()
        if first:
            return f"ip:{first}"
    return f"ip:{request.remote or 'unknown'}"


#: names what produced the answer (the emulator says so)
MODEL_SOURCE_HEADER = "X-Ecashbot-Model-Source"


async def chat_completions(request: web.Request) -> web.StreamResponse:
    """``POST /v1/chat/completions``: pay, answer, change."""
    pipeline = request.app[PIPELINE]
    cfg = request.app[CONFIG]
    try:
        raw_token = request.headers.get("X-Cashu")
        raw_quote = request.headers.get("X-Cashu-Quote", "").strip()
        if raw_quote and raw_token:
            raise BadRequest("send a token (X-Cashu) or a paid invoice (X-Cashu-Quote), not both")
        if raw_token is not None and len(raw_token) > cfg.http.max_token_bytes:
            raise BadRequest(
                f"X-Cashu is {len(raw_token)} bytes; the limit is {cfg.http.max_token_bytes}"
            )
        if request.content_length is not None and request.content_length > cfg.http.max_body_bytes:
            raise BadRequest("the request body is too large")
        try:
            body = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError) as exc:
            raise BadRequest("the body is not valid JSON") from exc
        chat = chat_request_from_openai(body)
        payment = QuotePayment(raw_quote) if raw_quote else parse_token_or_none(raw_token)
        answer = await pipeline.start(
            chat, payment, transport="http", payer=client_address(request)
        )
    except PaymentError as exc:
        return error_response(exc, invoice=await _offer_invoice(pipeline, exc))
    # who answers: "Gemini", or "Gemini emulator" under `ecashbot dev`
    source = {MODEL_SOURCE_HEADER: pipeline.llm.label}
    if chat.stream:
        resp = await _stream(request, answer, source)
    else:
        text, receipt = await answer.result()
        resp = _complete(answer, text, receipt)
        resp.headers.update(source)
        await resp.prepare(request)
        await resp.write_eof()
    # the change went out with the response (it also stays kept for POST /v1/change)
    await pipeline.wallet.store.mark_delivered(answer.request_id)
    return resp


async def change(request: web.Request) -> web.Response:
    """``POST /v1/change``: a payment's change or refund again, by token or request id."""
    pipeline = request.app[PIPELINE]
    request_id = request.headers.get("X-Request-Id")
    if not request_id and request.can_read_body:
        try:
            body = await request.json()
        except ValueError:
            body = None
        if isinstance(body, dict) and isinstance(body.get("request_id"), str):
            request_id = body["request_id"]
    try:
        got = await pipeline.pickup(
            token=request.headers.get("X-Cashu"),
            request_id=request_id,
            quote_id=request.headers.get("X-Cashu-Quote", "").strip() or None,
        )
    except PaymentError as exc:
        return error_response(exc)
    rec = got.record
    data: dict[str, Any] = {
        "request_id": rec.id,
        "status": rec.status,
        "change": rec.change_token,
        "change_sat": rec.change_sat,
        "paid_sat": rec.paid_sat,
        "fee_sat": rec.fee_sat,
        "charged_sat": rec.charged_sat,
        "refunded": rec.status == "refunded",
        "already_received": got.spent,
        # the answer, when a crash kept it from the payer (sent once, then forgotten)
        "answer": rec.answer,
    }
    headers = {"X-Request-Id": rec.id}
    if rec.change_token:
        headers["X-Cashu"] = rec.change_token
    if got.spent:
        data["message"] = "this change token was already received (its proofs are spent)"
    elif not rec.change_token:
        data["message"] = "this payment had no change"
    return web.json_response(data, headers=headers)


def _complete(answer: Answer, text: str, receipt: Receipt) -> web.Response:
    headers = {"X-Request-Id": receipt.request_id}
    if receipt.change_token:
        headers["X-Cashu"] = receipt.change_token
    if receipt.refunded:
        return web.json_response(
            {
                "error": {
                    "message": f"the model failed ({receipt.error}); your payment is refunded "
                    "(minus the mint fee) in X-Cashu and payment.change",
                    "type": "upstream_error",
                    "code": "upstream_error",
                },
                "payment": payment_json(receipt),
            },
            status=502,
            headers=headers,
        )
    return web.json_response(
        {
            "id": f"chatcmpl-{receipt.request_id}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": answer.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": _finish_reason(receipt),
                }
            ],
            "usage": usage_json(receipt),
            "payment": payment_json(receipt),
        },
        headers=headers,
    )


async def _stream(
    request: web.Request, answer: Answer, extra_headers: dict[str, str]
) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={
            "Content-Type": "text/event-stream",
            "Cache-Control": "no-cache",
            "X-Request-Id": answer.request_id,
            **extra_headers,
        }
    )
    await resp.prepare(request)
    base = {
        "id": f"chatcmpl-{answer.request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": answer.model,
    }

    async def send(obj: dict[str, Any]) -> None:
        await resp.write(b"data: " + json.dumps(obj).encode() + b"\n\n")

    first = True
    async for ev in answer:
        if isinstance(ev, Finished):
            r = ev.receipt
            final: dict[str, Any] = {
                **base,
                "choices": [{"index": 0, "delta": {}, "finish_reason": _finish_reason(r)}],
                "usage": usage_json(r),
                "payment": payment_json(r),
            }
            if r.refunded:
                final["error"] = {
                    "message": f"the model failed ({r.error}); your payment is refunded "
                    f"(minus the mint fee): {r.change_token}",
                    "type": "upstream_error",
                    "code": "upstream_error",
                    "payment": payment_json(r),
                }
            await send(final)
            await resp.write(b"data: [DONE]\n\n")
            break
        delta: dict[str, Any] = {"content": ev.text}
        if first:
            delta["role"] = "assistant"
            first = False
        await send({**base, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]})
    await resp.write_eof()
    return resp


async def models(request: web.Request) -> web.Response:
    """``GET /v1/models``: what is sold, at what price, for which ecash.

    ``payment.p2pk_pubkey`` is the key a wallet may lock its token to (NUT-11) instead of
    sending bearer ecash; null when the bot accepts no locked tokens.
    """
    cfg = request.app[CONFIG]
    lock_pubkey = request.app[PIPELINE].lock_pubkey
    return web.json_response(
        {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "owned_by": "google",
                    "pricing": {
                        "unit": "msat",
                        "input_per_1k_tokens": m.input_msat_per_1k,
                        "output_per_1k_tokens": m.output_msat_per_1k,
                        "per_request": m.request_msat,
                    },
                    "max_output_tokens": m.max_output_tokens,
                }
                for name, m in cfg.models.items()
            ],
            "payment": {
                "unit": cfg.unit,
                "mints": cfg.mints,
                "header": "X-Cashu",
                "rounding": "each cost part rounded down to a msat, the charge down to a sat",
                "fees": "the mint's input fee (NUT-02) of your token is paid from your token",
                "p2pk_pubkey": lock_pubkey,
                "p2pk_min_lock_s": None if lock_pubkey is None else cfg.locked.min_lock_s,
            },
        }
    )


async def stats(request: web.Request) -> web.Response:
    """``GET /v1/stats``: usage statistics and budget, for the operator (bearer token)."""
    cfg = request.app[CONFIG]
    token = cfg.operator.token
    if not token:
        raise web.HTTPNotFound(text="statistics are off (set operator.token)")
    given = request.headers.get("Authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        return web.json_response(
            {"error": {"message": "operator token required", "code": "unauthorized"}},
            status=401,
            headers={"WWW-Authenticate": "Bearer"},
        )
    pipeline = request.app[PIPELINE]
    try:
        data = await pipeline.state.stats()
        budget = {m: await pipeline.state.budget_left(m) for m in cfg.models}
    except StateUnavailable:
        return web.json_response(
            {"error": {"message": "state store unavailable", "code": "unavailable"}}, status=503
        )
    data["budget_left"] = budget
    data["wallet"] = {"held_sat": await pipeline.wallet.balance_sat()}
    return web.json_response(data)


async def health(request: web.Request) -> web.Response:
    """``GET /health``: the process is up."""
    return web.json_response({"status": "ok"})


def make_app(cfg: Config, pipeline: Pipeline) -> web.Application:
    """The aiohttp application over one pipeline."""
    app = web.Application(client_max_size=cfg.http.max_body_bytes)
    app[PIPELINE] = pipeline
    app[CONFIG] = cfg
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/change", change)
    app.router.add_get("/v1/stats", stats)
    app.router.add_get("/health", health)
    DashboardView(cfg, pipeline).add_routes(app.router)  # /dashboard, /metrics
    return app


def runner_args(cfg: Config) -> dict[str, Any]:
    """AppRunner handler args: read headers big enough to refuse large tokens ourselves."""
    return {"max_field_size": cfg.http.max_token_bytes * 2 + 1024}
