"""The one exception tree of a paid request.

Every error a payer can cause or meet is a :class:`PaymentError`. Each class carries,
once, the HTTP status it maps to and whether the payer's token was left untouched, so
the transports never decide money questions on their own. ``bot.errors`` adds the
pipeline-level errors (underpayment, upstream failure, ...) to this same tree.
"""

from __future__ import annotations


class PaymentError(Exception):
    """Base of every error a paid request can end in."""

    http_status: int = 400
    #: a short stable code for machines (JSON ``error.code``)
    code: str = "payment_error"
    #: True when the payer's token was not spent by us: they still hold their money.
    token_untouched: bool = True

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TokenError(PaymentError):
    """The token can't be used as it is; it was not sent anywhere."""

    code = "invalid_token"


class MalformedToken(TokenError):
    """Not a cashuA/cashuB token, or one that does not decode."""

    code = "malformed_token"


class UnsupportedToken(TokenError):
    """A well-formed token we don't take (other unit, several mints, locked, ...)."""

    code = "unsupported_token"


class UntrustedMint(TokenError):
    """The token names a mint that is not on the allow-list. We never contact it."""

    code = "untrusted_mint"


class UnknownKeyset(TokenError):
    """A proof's keyset id matches none (or, for a short id, more than one) of the mint's."""

    code = "unknown_keyset"


class InvalidDLEQ(TokenError):
    """A DLEQ proof is present and does not verify: the mint did not sign this proof."""

    code = "invalid_dleq"


class LockRefused(UnsupportedToken):
    """A locked token (NUT-10/11) the bot can't take as it is: another key, a refund path
    that opens too soon, a multisig, no DLEQ. Never sent anywhere: its owner keeps it."""

    code = "locked_token"


class TokenSpent(PaymentError):
    """The mint says (some of) the token's proofs are already spent."""

    code = "token_spent"
    token_untouched = False


class MintError(PaymentError):
    """The mint answered with an error we did not expect, or not at all."""

    http_status = 502
    code = "mint_error"

    def __init__(self, message: str, mint_code: int | None = None) -> None:
        super().__init__(message)
        self.mint_code = mint_code


class MintUnavailable(MintError):
    """The mint could not be reached (connection refused, timeout)."""

    http_status = 503
    code = "mint_unavailable"


class MintBusy(MintUnavailable):
    """The mint refused for a passing reason (its database was locked); nothing was spent.

    Safe to retry with the same outputs: the deterministic outputs make a repeated swap
    either do the work once or be recognised (NUT-07/NUT-09) as already done.
    """

    code = "mint_busy"


class SwapPending(MintUnavailable):
    """The swap was sent but its outcome is unknown (the mint went quiet): the token may
    be spent already. Recovery resolves it (NUT-07/NUT-09) and refunds or answers; the
    payer must not spend the token elsewhere in the meantime."""

    code = "payment_pending"
    token_untouched = False


class MalformedPaymentRequest(MalformedToken):
    """A NUT-18 payment request (``creqA...``) that does not decode."""

    code = "malformed_payment_request"


class InvalidMintUrl(UntrustedMint, ValueError):
    """Not an http(s) URL a mint could live at.

    Also a :class:`ValueError`, so a pydantic validator that meets one in the config
    reports it as a validation error.
    """

    code = "invalid_mint_url"


# -- Lightning (NUT-04 mint quotes as payments, NUT-05 melts) ----------------------------


class QuoteError(PaymentError):
    """A paid Lightning invoice (a NUT-04 mint quote id) that can't pay for this request."""

    code = "quote_error"


class UnknownQuote(QuoteError):
    """No trusted mint knows this quote id."""

    http_status = 404
    code = "unknown_quote"


class QuoteNotPaid(QuoteError):
    """The quote's invoice is not paid (yet). Pay it, then send the quote id again."""

    http_status = 402
    code = "quote_not_paid"


class QuoteUsed(QuoteError):
    """The quote's ecash was already minted: the invoice paid for an earlier request."""

    http_status = 409
    code = "quote_used"
    token_untouched = False


class QuoteExpired(QuoteError):
    """The quote expired before its ecash was minted; the mint no longer issues it."""

    http_status = 410
    code = "quote_expired"


class LightningFailed(MintError):
    """The mint could not pay the Lightning invoice of a melt (NUT-05); inputs not spent."""

    code = "lightning_failed"


class WalletError(Exception):
    """An operation of the operator's own wallet (send, withdraw, payout) failed."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InsufficientFunds(WalletError):
    """The wallet holds too little free ecash at that mint for the operation."""

    def __init__(self, message: str, *, need_sat: int, have_sat: int) -> None:
        super().__init__(message)
        self.need_sat = need_sat
        self.have_sat = have_sat


class FeeTooHigh(WalletError):
    """The mint's Lightning fee reserve is above the limit set for this payment."""


class BadInvoice(WalletError):
    """A bolt11 invoice we can't pay: undecodable, without an amount, or the wrong amount."""


class MeltFailed(WalletError):
    """The Lightning payment failed; the proofs it would have spent are free again."""


class MeltPending(WalletError):
    """The Lightning payment is still in flight at the mint; recovery will finish it."""
