"""Prices, the output cap a payment buys, and settlement. Pure functions, integer money.

Units are in the names: ``*_msat`` is millisatoshi, ``*_sat`` is satoshi, ``*_tokens``
counts LLM tokens. Nothing here does I/O.

Rounding rule (in the payer's favour, everywhere):

* the cost of each part (request, input, output) is rounded *down* to a whole msat;
* the charge in sat is the cost rounded *down* to a whole sat (the fraction is waived);
* the output cap is rounded *down*, so an answer at the cap never costs more than paid;
* the input estimate is rounded *up* (over-estimating input only lowers the cap).
"""

from __future__ import annotations

from dataclasses import dataclass

MSAT_PER_SAT = 1000


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """What one model costs. Thinking tokens are billed as output tokens."""

    input_msat_per_1k: int
    output_msat_per_1k: int
    request_msat: int = 0
    #: the model's own output limit (thinking included)
    max_output_tokens: int = 8192

    def __post_init__(self) -> None:
        for name in ("input_msat_per_1k", "output_msat_per_1k", "request_msat"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        if self.output_msat_per_1k == 0 and self.input_msat_per_1k == 0 and self.request_msat == 0:
            raise ValueError("a model must cost something")
        if self.max_output_tokens <= 0:
            raise ValueError("max_output_tokens must be positive")


def estimate_input_tokens(text_bytes: int, messages: int = 1) -> int:
    """A conservative estimate of input tokens: UTF-8 bytes / 3, rounded up, plus framing.

    Gemini's tokenizer averages ~4 bytes per token on prose; dividing by 3 over-estimates,
    which only lowers the cap. The real count settles the bill afterwards.
    """
    if text_bytes < 0 or messages < 0:
        raise ValueError("sizes are non-negative")
    return -(-text_bytes // 3) + 4 * messages


def input_cost_msat(price: ModelPrice, input_tokens: int) -> int:
    """Cost of the input tokens, rounded down to a whole msat."""
    return input_tokens * price.input_msat_per_1k // 1000


def output_cost_msat(price: ModelPrice, output_tokens: int) -> int:
    """Cost of output (candidates + thoughts) tokens, rounded down to a whole msat."""
    return output_tokens * price.output_msat_per_1k // 1000


def cost_msat(price: ModelPrice, input_tokens: int, output_tokens: int) -> int:
    """Total cost of one answer in msat."""
    if input_tokens < 0 or output_tokens < 0:
        raise ValueError("token counts are non-negative")
    return (
        price.request_msat
        + input_cost_msat(price, input_tokens)
        + output_cost_msat(price, output_tokens)
    )


def max_output_tokens_for(price: ModelPrice, budget_msat: int, input_tokens: int) -> int:
    """The largest output that ``budget_msat`` covers after the request and input cost.

    The result ``n`` satisfies ``cost_msat(price, input_tokens, n) <= budget_msat`` and is
    never above the model's own limit. Zero when the budget doesn't cover the input.
    """
    left_msat = budget_msat - price.request_msat - input_cost_msat(price, input_tokens)
    if left_msat < 0:
        return 0
    if price.output_msat_per_1k == 0:
        return price.max_output_tokens
    # floor(n * rate / 1000) <= left  <=>  n * rate < (left + 1) * 1000
    n = ((left_msat + 1) * 1000 - 1) // price.output_msat_per_1k
    return min(n, price.max_output_tokens)


@dataclass(frozen=True, slots=True)
class Quote:
    """What a payment buys: the output cap sent to the model, and the budget behind it."""

    paid_sat: int
    fee_sat: int
    budget_msat: int
    input_tokens_estimate: int
    max_output_tokens: int


def quote(
    price: ModelPrice,
    *,
    paid_sat: int,
    fee_sat: int,
    input_tokens_estimate: int,
    requested_max_tokens: int | None = None,
) -> Quote:
    """Quote a payment: what is left after the mint fee buys at most this many output tokens.

    The cap is never above ``requested_max_tokens`` (the client's ``max_tokens``) nor the
    model's limit, so no answer can cost more than was paid.
    """
    if paid_sat < 0 or fee_sat < 0:
        raise ValueError("amounts are non-negative")
    budget_msat = max(0, paid_sat - fee_sat) * MSAT_PER_SAT
    cap = max_output_tokens_for(price, budget_msat, input_tokens_estimate)
    if requested_max_tokens is not None:
        cap = min(cap, max(0, requested_max_tokens))
    return Quote(
        paid_sat=paid_sat,
        fee_sat=fee_sat,
        budget_msat=budget_msat,
        input_tokens_estimate=input_tokens_estimate,
        max_output_tokens=cap,
    )


def required_sat(
    price: ModelPrice, *, input_tokens_estimate: int, output_tokens: int, fee_sat: int
) -> int:
    """The smallest payment (in sat) whose quote covers ``output_tokens`` of output."""
    need_msat = cost_msat(price, input_tokens_estimate, output_tokens)
    return -(-need_msat // MSAT_PER_SAT) + fee_sat


@dataclass(frozen=True, slots=True)
class Settlement:
    """The bill of one answer. ``paid_sat == charged_sat + change_sat + fee_sat``."""

    paid_sat: int
    fee_sat: int
    cost_msat: int
    charged_sat: int
    change_sat: int
    input_tokens: int
    output_tokens: int
    estimated: bool


def settle(
    price: ModelPrice,
    q: Quote,
    *,
    input_tokens: int | None,
    output_tokens: int | None,
) -> Settlement:
    """Settle from the model's final usage; without usage, from the quote's estimate.

    Without usage (the stream died) the answer is billed as the estimated input plus the
    full cap: the most it could have cost, and never more than was paid.
    """
    estimated = input_tokens is None or output_tokens is None
    in_tokens = q.input_tokens_estimate if input_tokens is None else input_tokens
    out_tokens = q.max_output_tokens if output_tokens is None else output_tokens
    full_msat = cost_msat(price, in_tokens, out_tokens)
    billed_msat = min(full_msat, q.budget_msat)
    charged_sat = billed_msat // MSAT_PER_SAT
    change_sat = q.paid_sat - q.fee_sat - charged_sat
    return Settlement(
        paid_sat=q.paid_sat,
        fee_sat=q.fee_sat,
        cost_msat=billed_msat,
        charged_sat=charged_sat,
        change_sat=change_sat,
        input_tokens=in_tokens,
        output_tokens=out_tokens,
        estimated=estimated,
    )


def refund(q: Quote) -> Settlement:
    """A failed answer: nothing charged, everything but the unavoidable mint fee returned."""
    return Settlement(
        paid_sat=q.paid_sat,
        fee_sat=q.fee_sat,
        cost_msat=0,
        charged_sat=0,
        change_sat=q.paid_sat - q.fee_sat,
        input_tokens=0,
        output_tokens=0,
        estimated=False,
    )


def input_fee_sat(fee_ppk_per_input: list[int]) -> int:
    """NUT-02 fee of spending these inputs: ceil(sum of input_fee_ppk / 1000) sat."""
    return -(-sum(fee_ppk_per_input) // 1000)
