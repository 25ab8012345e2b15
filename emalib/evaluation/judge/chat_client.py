"""The one asynchronous OpenAI-compatible chat client of emalib: the judge, the RL grader and persona extraction (whose
judgments go through the judge) all open it here, so the key rule (emalib.core.credentials), the retries and timeout,
the bound on calls in flight and the wording of a failed call are the same for every caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from emalib.core.credentials import NO_KEY, api_key_for


@dataclass(frozen=True)
class ChatEndpoint:
    """Where the calls go and how hard they try: the `judge:` block's settings, whichever caller uses them."""

    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_retries: int = 6
    timeout_s: float = 60.0
    max_concurrency: int = 8

    @property
    def where(self) -> str:
        return self.base_url or "api.openai.com"

    def failure(self, who: str, client, err: Exception) -> str:
        """One line for a call of `client` that failed after the SDK's retries (429, 5xx and connection errors are
        retried), with what to do when a server refused a call that carried no key."""
        hint = ""
        if getattr(err, "status_code", None) == 401 and client.api_key == NO_KEY:
            hint = " (no key was sent to this server: name the variable that holds its key in judge.api_key_env)"
        return f"{who} at {self.where} failed after {self.max_retries} retries: {type(err).__name__}: {err}{hint}"


@asynccontextmanager
async def chat_client(endpoint: ChatEndpoint) -> AsyncIterator[tuple[object, asyncio.Semaphore]]:
    """(an AsyncOpenAI client, the semaphore bounding its calls in flight), closed when the block ends."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=api_key_for(endpoint.api_key_env, endpoint.base_url), base_url=endpoint.base_url,
                         max_retries=endpoint.max_retries, timeout=endpoint.timeout_s)
    try:
        yield client, asyncio.Semaphore(endpoint.max_concurrency)
    finally:
        await client.close()
