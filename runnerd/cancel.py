"""An operator's cancel (`runnerd cancel ID`): one script on the execution's partition decides
and writes everything, so a cancel racing the execution's own end leaves exactly one result.

- a result exists: the execution has finished; that result is returned, untouched;
- none of its submitted marker, checkpoint or input exists: no such execution (or it expired);
- otherwise the cancel marker is set (workers check it when they take the entry, before every
  step and, for what they run, every CANCEL_POLL_S: the running step's child is killed) and
  the `cancelled` result is written and announced on the completions stream, so waiters are
  resolved at once, whether or not a worker ever takes the entry again. The worker that does
  then acks it and cleans its input and checkpoint; its own result (SET NX) is not written.
"""

from __future__ import annotations

import time
from typing import Any, Literal

import msgspec

from runnerd.keys import Keys
from runnerd.messages import ExecutionResult, encoder, result_decoder
from runnerd.store import RedisClient, announcement
from sandbox.protocol import StepError

CancelOutcome = Literal["cancelled", "finished", "unknown"]
CANCELLED_MESSAGE = "cancelled by an operator"

# KEYS: result, submitted, checkpoint, input, cancel marker, completions stream.
# ARGV: ttl ms, the cancelled result, its completion entry, the ms of entries the stream keeps.
_REQUEST_CANCEL = """
local existing = redis.call('GET', KEYS[1])
if existing then return {'finished', existing} end
if redis.call('EXISTS', KEYS[2], KEYS[3], KEYS[4]) == 0 then return {'unknown', ''} end
redis.call('SET', KEYS[5], '1', 'PX', ARGV[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[1])
local announced = redis.call('XADD', KEYS[6], '*', 'c', ARGV[3])
local oldest = tonumber(string.match(announced, '^%d+')) - tonumber(ARGV[4])
redis.call('XTRIM', KEYS[6], 'MINID', '~', string.format('%d', oldest))
-- As a completion does: the id is not enqueued again while its result is kept.
redis.call('PEXPIRE', KEYS[2], ARGV[1])
return {'cancelled', ARGV[2]}
"""


def cancelled_result(execution_id: str, worker: str = "") -> ExecutionResult:
    return ExecutionResult(
        execution_id=execution_id,
        status="cancelled",
        error=StepError("cancelled", CANCELLED_MESSAGE),
        worker=worker,
        finished_at=time.time(),
    )


async def request_cancel(
    redis: RedisClient, keys: Keys, execution_id: str, result_ttl_s: float
) -> tuple[CancelOutcome, ExecutionResult | None]:
    """Cancel an execution. Raises ValueError (a readable message) for an id that is not one of
    this deployment's. "finished" comes with the result already there (None if it cannot be
    decoded), "cancelled" with the result just written, "unknown" with None."""
    partition = keys.partition_of(execution_id)
    result = cancelled_result(execution_id)
    encoded = encoder.encode(result)
    script = redis.register_script(_REQUEST_CANCEL)
    reply: Any = await script(
        keys=[
            keys.result(execution_id),
            keys.submitted(execution_id),
            keys.checkpoint(execution_id),
            keys.input(execution_id),
            keys.cancel(execution_id),
            keys.completions(partition),
        ],
        args=[int(result_ttl_s * 1000), encoded, *announcement(result, encoded)],
    )
    outcome, raw = _text(reply[0]), bytes(reply[1]) if isinstance(reply[1], bytes) else b""
    if outcome == "unknown":
        return "unknown", None
    if outcome == "cancelled":
        return "cancelled", result
    try:
        return "finished", result_decoder.decode(raw)
    except msgspec.DecodeError:
        return "finished", None


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
