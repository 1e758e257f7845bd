"""Token budgets per client key: N tokens per UTC day, week (from Monday) or month, enforced at admission.

The spend is the usage ledger's, the one settlement pays from (deploy/usage.py `UsageStore.reserve`):
a request of a budgeted key reserves its worst case (prompt + max_tokens x n, routing/metering
`reservation`) there before a node is chosen, and the reservation becomes the gateway's count when its
record is written (for a request that failed or was left mid-stream: what it forwarded). So concurrent requests can never spend more than the budget between them, and no
second counter can drift from what is billed. A refusal is OpenAI's 429 `insufficient_quota`, with
`Retry-After` set to the window's reset.
"""

from __future__ import annotations

import datetime as dt
from typing import Literal

from routing import errors, metrics

Period = Literal["day", "week", "month"]
PERIODS: tuple[Period, ...] = ("day", "week", "month")


def window(period: Period, now: float) -> tuple[float, float]:
    """(start, end) in unix time of the UTC `period` holding `now`."""
    t = dt.datetime.fromtimestamp(now, dt.UTC)
    start = t.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == "day":
        end = start + dt.timedelta(days=1)
    elif period == "week":
        start -= dt.timedelta(days=start.weekday())
        end = start + dt.timedelta(weeks=1)
    else:
        start = start.replace(day=1)
        end = (start + dt.timedelta(days=32)).replace(day=1)
    return start.timestamp(), end.timestamp()


def exhausted(
    key_id: str, budget: int, used: int, asked: int, period: Period, reset_in_s: float
) -> errors.APIError:
    metrics.KEY_REQUESTS.labels(key_id, "over_budget").inc()
    return errors.APIError(
        429,
        f"API key {key_id} has used {used} of its {budget} tokens this {period}, and this request may take "
        f"up to {asked} more (prompt + max_tokens x n). Lower max_tokens, or wait for the budget to reset "
        f"in {reset_in_s / 3600:.1f} h.",
        type="insufficient_quota",
        code="insufficient_quota",
        retry_after_s=reset_in_s,
    )


async def reserve(store, key, request_id: str, tokens: int, now: float, ttl_s: float) -> None:
    """Hold `tokens` of `key`'s budget in the usage store `store` for `request_id`, or raise the 429."""
    start, end = window(key.budget_period, now)
    used = await store.reserve.remote(key.key_id, request_id, tokens, key.budget_tokens, start, ttl_s)
    if used < 0:
        metrics.KEY_BUDGET_USED.labels(key.key_id).set(-1 - used)
        raise exhausted(key.key_id, key.budget_tokens, -1 - used, tokens, key.budget_period, end - now)
    metrics.KEY_BUDGET_USED.labels(key.key_id).set(used)
