"""Pure pricing: prices per model, the output cap a payment buys, settlement. No I/O."""

from pricing.prices import (
    MSAT_PER_SAT,
    ModelPrice,
    Quote,
    Settlement,
    cost_msat,
    estimate_input_tokens,
    input_fee_sat,
    max_output_tokens_for,
    quote,
    refund,
    required_sat,
    settle,
)

__all__ = [
    "MSAT_PER_SAT",
    "ModelPrice",
    "Quote",
    "Settlement",
    "cost_msat",
    "estimate_input_tokens",
    "input_fee_sat",
    "max_output_tokens_for",
    "quote",
    "refund",
    "required_sat",
    "settle",
]
