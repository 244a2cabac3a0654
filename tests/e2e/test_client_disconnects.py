"""Clients that leave mid-stream, or before their first token, leave nothing held behind: every kv-store pin
ends with its request, and every worker's pool is whole again within seconds (the pins' leases are ~35 s, so
a pin that is only ever ended by its lease fails this)."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest

from e2e_stack import API_KEY, wait_until_pools_whole

pytestmark = pytest.mark.timeout(300)


def test_streams_closed_early_leave_no_pins(stack):
    model = httpx.get(f"{stack.base_url}/models", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=30).json()["data"][0]["id"]
    rng = random.Random(3)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # Prompts of several full blocks (block size 16), so every decode pulls blocks from the store; four shared
    # prefixes, so prefill workers also pin blocks others stored (prefix reuse) and reserve present ones.
    prefixes = [[rng.randrange(3, 200) for _ in range(64)] for _ in range(4)]
    prompts = [prefixes[i % 4] + [rng.randrange(3, 200) for _ in range(rng.randint(1, 120))] for i in range(48)]

    async def close_after_tokens(http: httpx.AsyncClient, prompt: list[int], tokens: int) -> int:
        body = {"model": model, "prompt": prompt, "max_tokens": 200, "temperature": 0.0, "ignore_eos": True,
                "stream": True}
        seen = 0
        async with http.stream("POST", f"{stack.base_url}/completions", json=body, headers=headers) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                if seen >= tokens:
                    break
        return seen

    async def cancel_before_first_token(http: httpx.AsyncClient, prompt: list[int], delay_s: float) -> None:
        task = asyncio.ensure_future(close_after_tokens(http, prompt, 1_000))
        await asyncio.sleep(delay_s)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def main():
        limits = httpx.Limits(max_connections=64, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as http:
            results = []
            for _ in range(3):
                early = [close_after_tokens(http, p, rng.randint(1, 4)) for p in prompts[:32]]
                before = [cancel_before_first_token(http, p, rng.uniform(0.0, 0.3)) for p in prompts[32:]]
                results += (await asyncio.gather(*early, *before))[:32]
            return results

    results = asyncio.run(main())
    assert all(seen >= 1 for seen in results)
    whole, stats, store = wait_until_pools_whole(stack, timeout_s=5.0)
    assert whole, (stats, store)
