"""Key budgets on the running network (issue 30), as a user meets them: `meritnet keys create
--budget-tokens`, then the official openai client with 8 requests at once. The budget holds (what the
ledger bills the key never exceeds it), refusals are 429 insufficient_quota with Retry-After, and the
gateway reads the key file while it runs. The key file is removed after, so the package's endpoint is
open again for the modules that follow."""

from __future__ import annotations

import concurrent.futures as cf
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest

from tests.support.waiting import wait_until

pytestmark = pytest.mark.integration
MAX_TOKENS = 4


def test_a_budgeted_key_never_overspends_under_concurrent_requests(network):
    from routing.budgets import window
    from routing.keys import KEYS_FILE, KeyStore
    from tests.support.package_network import usage_by_id

    state_dir = network.config.state_dir
    prompt = "budgets hold under load"
    ids = httpx.post(f"{network.base_url}/tokenize", json={"model": "default", "prompt": prompt}).json()
    worst = ids["count"] + MAX_TOKENS  # what each request holds while it runs
    budget = 3 * worst
    meritnet = str(Path(sys.executable).parent / "meritnet")
    made = subprocess.run(
        [
            meritnet,
            "keys",
            "create",
            "--budget-tokens",
            str(budget),
            "--budget-period",
            "day",
            "--state-dir",
            str(state_dir),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = made.stdout.strip().splitlines()[-1]
    (key,) = KeyStore(state_dir / KEYS_FILE).load()
    try:
        wait_until(lambda: httpx.get(f"{network.base_url}/v1/models").status_code == 401, timeout_s=30)
        client = openai.OpenAI(base_url=f"{network.base_url}/v1", api_key=secret, max_retries=0, timeout=120)

        def ask(i: int):
            try:
                done = client.completions.create(
                    model="default", prompt=prompt, max_tokens=MAX_TOKENS, seed=i
                )
                return done.id
            except openai.RateLimitError as exc:
                return exc

        with cf.ThreadPoolExecutor(8) as pool:
            outcomes = list(pool.map(ask, range(8)))
        refused = [o for o in outcomes if isinstance(o, openai.RateLimitError)]
        assert refused and len(refused) < 8, outcomes
        assert all(
            r.code == "insufficient_quota" and int(r.response.headers["retry-after"]) > 0 for r in refused
        )
        since = window("day", time.time())[0]
        billed = [
            r
            for r in wait_until(usage_by_id, timeout_s=30).values()
            if r.key_id == key.key_id and r.status == "ok" and r.ended_at >= since
        ]
        assert len(billed) == 8 - len(refused)
        assert sum(r.prompt_tokens + r.completion_tokens for r in billed) <= budget
    finally:
        (state_dir / KEYS_FILE).unlink()
        wait_until(lambda: httpx.get(f"{network.base_url}/v1/models").status_code == 200, timeout_s=30)
