"""Pipeline-level errors, in the one tree rooted at :class:`mint_client.errors.PaymentError`.

Each class says once how it maps to HTTP (``http_status``) and whether the payer still
holds their token (``token_untouched``). Transports turn them into replies; they never
decide money questions themselves.
"""

from __future__ import annotations

from mint_client.errors import (
    InvalidDLEQ,
    MalformedToken,
    MintError,
    MintUnavailable,
    PaymentError,
    TokenError,
    TokenSpent,
    UnknownKeyset,
    UnsupportedToken,
    UntrustedMint,
)

__all__ = [
    "BadRequest",
    "ChangeNotFound",
    "ChangePending",
    "InvalidDLEQ",
    "MalformedToken",
    "MintError",
    "MintUnavailable",
    "PaymentError",
    "PaymentRequired",
    "RateLimited",
    "RequestTooLarge",
    "ServiceUnavailable",
    "TokenError",
    "TokenSpent",
    "Underpaid",
    "UnknownKeyset",
    "UnknownModel",
    "UnsupportedToken",
    "UntrustedMint",
]


class PaymentRequired(PaymentError):
    """No payment came with the request. Carries what to pay (a NUT-18 request)."""

    http_status = 402
    code = "payment_required"

    def __init__(self, message: str, *, amount_sat: int, payment_request: str) -> None:
        super().__init__(message)
        self.amount_sat = amount_sat
        self.payment_request = payment_request


class Underpaid(PaymentRequired):
    """The token is worth too little for this request. It was not spent."""

    code = "underpaid"


class BadRequest(PaymentError):
    """The question itself is unusable (bad JSON, empty messages, ...). Nothing spent."""

    code = "bad_request"


class UnknownModel(BadRequest):
    """The model asked for is not sold here."""

    code = "unknown_model"


class RateLimited(PaymentError):
    """Too many requests from this payer for now. Nothing spent; try again later."""

    http_status = 429
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ServiceUnavailable(PaymentError):
    """The bot can't take payments right now (its state store is down). Nothing spent."""

    http_status = 503
    code = "unavailable"


class ChangeNotFound(PaymentError):
    """No change is kept for that payment."""

    http_status = 404
    code = "change_not_found"


class ChangePending(PaymentError):
    """The payment is still being answered or resolved."""

    http_status = 409
    code = "change_pending"


class RequestTooLarge(BadRequest):
    """The question or the token is larger than the limits. Nothing spent."""

    http_status = 413
    code = "too_large"
