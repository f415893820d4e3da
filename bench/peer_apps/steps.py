"""The work every system does, as plain functions: the same as runnerd's bench steps
(bench/integrations.py), so each result can be checked the same way."""

from __future__ import annotations

from typing import Any

CHAIN_STEPS = 6


def trivial(n: int) -> dict[str, Any]:
    return {"n": n}


def chain_input(n: int) -> dict[str, Any]:
    return {"n": n, "v": n, "trail": []}


def chain_step(state: dict[str, Any]) -> dict[str, Any]:
    """Step i of the chain: v -> 2 v + i, and the step appends its index."""
    i = len(state["trail"])
    return {"n": state["n"], "v": state["v"] * 2 + i, "trail": [*state["trail"], i]}


def expected_chain(n: int) -> dict[str, Any]:
    state = chain_input(n)
    for _ in range(CHAIN_STEPS):
        state = chain_step(state)
    return state
