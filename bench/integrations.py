"""The integrations the Redis scenarios submit, and the check that each result is the right one.

Every result is checked (a stale, cached or half-run answer would make the figures mean
nothing), and every step must report the confinement layers it ran under.
"""

from __future__ import annotations

from typing import Any, Literal

from runnerd.client import Result
from runnerd.messages import Integration

CHAIN_STEPS = 6

TRIVIAL_PY = "def run(input, ctx):\n    return {'n': input['n']}\n"
TRIVIAL_JS = "export function run(input, ctx) {\n  return { n: input.n };\n}\n"

# Step i of the chain: the value goes through v -> 2 v + i, and the step appends its index.
CHAIN_PY = (
    "def run(input, ctx):\n"
    "    i = len(input['trail'])\n"
    "    return {'n': input['n'], 'v': input['v'] * 2 + i, 'trail': input['trail'] + [i]}\n"
)
CHAIN_JS = (
    "export function run(input, ctx) {\n"
    "  const i = input.trail.length;\n"
    "  return { n: input.n, v: input.v * 2 + i, trail: [...input.trail, i] };\n"
    "}\n"
)
# The payload passes through every step; the step reads its first and last byte and its
# length, so the bytes are really there, and counts the hops.
PAYLOAD_PY = (
    "def run(input, ctx):\n"
    "    data = input['data']\n"
    "    edges = (data[:1], data[-1:], len(data))\n"
    "    return {'n': input['n'], 'hops': input['hops'] + 1, 'data': data, 'edges': edges}\n"
)


class WrongResult(Exception):
    """An execution did not succeed or did not return what its steps compute."""


def trivial(runtime: Literal["python", "node"] = "python") -> Integration:
    if runtime == "node":
        step = {"name": "echo", "source": TRIVIAL_JS, "runtime": "node"}
        return Integration.from_dict({"name": "bench-trivial-js", "steps": [step]})
    return Integration.from_dict(
        {"name": "bench-trivial", "steps": [{"name": "echo", "source": TRIVIAL_PY}]}
    )


def chain(kind: Literal["python", "mixed", "js"] = "python") -> Integration:
    """Six steps: all Python, every second one JavaScript (mixed), or all JavaScript."""
    steps = []
    for i in range(CHAIN_STEPS):
        if kind == "js" or (kind == "mixed" and i % 2 == 1):
            steps.append({"name": f"s{i}", "source": CHAIN_JS, "runtime": "node"})
        else:
            steps.append({"name": f"s{i}", "source": CHAIN_PY})
    name = "bench-chain" if kind == "python" else f"bench-chain-{kind}"
    return Integration.from_dict({"name": name, "steps": steps})


def payload() -> Integration:
    steps = [{"name": f"p{i}", "source": PAYLOAD_PY} for i in range(CHAIN_STEPS)]
    # 64 MB in and out of each step: keep room for input, output and their encodings.
    limits = {"memory_mb": 2048, "output_mb": 256}
    return Integration.from_dict({"name": "bench-payload", "limits": limits, "steps": steps})


def trivial_input(n: int) -> dict[str, Any]:
    return {"n": n}


def chain_input(n: int) -> dict[str, Any]:
    return {"n": n, "v": n, "trail": []}


def payload_input(n: int, data: bytes) -> dict[str, Any]:
    return {"n": n, "hops": 0, "data": data}


def check_trivial(n: int, result: Result) -> list[str]:
    return _check(result, {"n": n})


def check_chain(n: int, result: Result) -> list[str]:
    v = n
    for i in range(CHAIN_STEPS):
        v = v * 2 + i
    return _check(result, {"n": n, "v": v, "trail": list(range(CHAIN_STEPS))})


def check_payload(n: int, data: bytes, result: Result) -> list[str]:
    edges = [data[:1], data[-1:], len(data)]
    expected = {"n": n, "hops": CHAIN_STEPS, "data": data, "edges": edges}
    return _check(result, expected, describe=f"payload {n} ({len(data)} bytes)")


def _check(result: Result, expected: dict[str, Any], describe: str = "") -> list[str]:
    """Raise unless the result is the expected one; return the layers every step ran under."""
    what = describe or repr(expected)[:80]
    if not result.ok:
        raise WrongResult(f"{what}: {result.status} at {result.failed_step}: {result.error}")
    if result.output != expected:
        raise WrongResult(f"{what}: got {repr(result.output)[:200]}")
    layer_sets = {tuple(sorted(step.outcome.layers)) for step in result.steps}
    if len(result.steps) == 0 or () in layer_sets:
        raise WrongResult(f"{what}: a step ran without any confinement layer")
    return sorted(set().union(*layer_sets))
