"""Pricing is pure: property tests that no answer costs more than was paid."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pricing import (
    ModelPrice,
    cost_msat,
    estimate_input_tokens,
    input_fee_sat,
    max_output_tokens_for,
    quote,
    refund,
    required_sat,
    settle,
)

prices = st.builds(
    ModelPrice,
    input_msat_per_1k=st.integers(0, 10**7),
    output_msat_per_1k=st.integers(1, 10**7),
    request_msat=st.integers(0, 10**6),
    max_output_tokens=st.integers(1, 10**6),
)


def test_cost_rounds_each_part_down() -> None:
    p = ModelPrice(input_msat_per_1k=300, output_msat_per_1k=2500, request_msat=7)
    # 3 input tokens: 0.9 msat -> 0; 1 output token: 2.5 msat -> 2
    assert cost_msat(p, 3, 1) == 7 + 0 + 2
    assert cost_msat(p, 1000, 1000) == 7 + 300 + 2500


def test_cap_example() -> None:
    p = ModelPrice(input_msat_per_1k=1000, output_msat_per_1k=2000, max_output_tokens=10**6)
    # 10 sat = 10_000 msat; 1000 input tokens cost 1000 msat; 9000 msat buys 4500 tokens
    q = quote(p, paid_sat=11, fee_sat=1, input_tokens_estimate=1000)
    assert q.budget_msat == 10_000
    assert q.max_output_tokens == 4500
    assert cost_msat(p, 1000, 4500) == 10_000
    assert cost_msat(p, 1000, 4501) > 10_000


@given(prices, st.integers(0, 10**9), st.integers(0, 10**6))
def test_cap_is_the_largest_affordable_output(p: ModelPrice, budget: int, inp: int) -> None:
    n = max_output_tokens_for(p, budget, inp)
    assert 0 <= n <= p.max_output_tokens
    if n > 0:
        assert cost_msat(p, inp, n) <= budget
    if n < p.max_output_tokens and cost_msat(p, inp, 0) <= budget:
        assert cost_msat(p, inp, n + 1) > budget


@given(
    prices,
    st.integers(0, 10**6),
    st.integers(0, 50),
    st.integers(0, 10**5),
    st.integers(0, 10**6),
    st.integers(0, 10**6),
    st.none() | st.integers(1, 10**6),
)
def test_settlement_never_charges_more_than_paid(
    p: ModelPrice,
    paid: int,
    fee: int,
    est: int,
    real_in: int,
    real_out: int,
    max_tokens: int | None,
) -> None:
    q = quote(
        p,
        paid_sat=paid + fee,
        fee_sat=fee,
        input_tokens_estimate=est,
        requested_max_tokens=max_tokens,
    )
    s = settle(p, q, input_tokens=real_in, output_tokens=real_out)
    assert s.charged_sat + s.change_sat + s.fee_sat == s.paid_sat
    assert 0 <= s.charged_sat <= paid
    assert s.change_sat >= 0
    assert s.cost_msat <= q.budget_msat
    if max_tokens is not None:
        assert q.max_output_tokens <= max_tokens


@given(prices, st.integers(0, 10**6), st.integers(0, 50), st.integers(0, 10**5))
def test_missing_usage_bills_the_estimate_at_most(
    p: ModelPrice, paid: int, fee: int, est: int
) -> None:
    q = quote(p, paid_sat=paid + fee, fee_sat=fee, input_tokens_estimate=est)
    s = settle(p, q, input_tokens=None, output_tokens=None)
    assert s.estimated
    assert s.charged_sat <= paid
    assert s.charged_sat + s.change_sat + s.fee_sat == s.paid_sat


@given(prices, st.integers(0, 10**5), st.integers(1, 10**5), st.integers(0, 20))
def test_required_amount_buys_what_it_promises(p: ModelPrice, est: int, out: int, fee: int) -> None:
    need = required_sat(p, input_tokens_estimate=est, output_tokens=out, fee_sat=fee)
    q = quote(p, paid_sat=need, fee_sat=fee, input_tokens_estimate=est)
    assert q.max_output_tokens >= min(out, p.max_output_tokens)
    # and it is the least such amount: one sat less does not cover the cost
    if need - fee > 0:
        assert cost_msat(p, est, out) > (need - 1 - fee) * 1000


def test_refund_returns_all_but_the_fee() -> None:
    p = ModelPrice(input_msat_per_1k=1, output_msat_per_1k=1)
    q = quote(p, paid_sat=500, fee_sat=2, input_tokens_estimate=10)
    r = refund(q)
    assert (r.charged_sat, r.change_sat, r.fee_sat) == (0, 498, 2)


def test_input_fee_rounds_up() -> None:
    assert input_fee_sat([]) == 0
    assert input_fee_sat([100]) == 1
    assert input_fee_sat([100] * 10) == 1
    assert input_fee_sat([100] * 11) == 2


def test_estimate_is_conservative() -> None:
    assert estimate_input_tokens(0, 0) == 0
    assert estimate_input_tokens(3, 1) == 1 + 4
    assert estimate_input_tokens(4, 1) == 2 + 4


@pytest.mark.parametrize("bad", [{"input_msat_per_1k": -1}, {"output_msat_per_1k": 1.5}])
def test_prices_are_non_negative_integers(bad: dict[str, object]) -> None:
    kwargs: dict[str, object] = {"input_msat_per_1k": 1, "output_msat_per_1k": 1, **bad}
    with pytest.raises(ValueError):
        ModelPrice(**kwargs)  # type: ignore[arg-type]
