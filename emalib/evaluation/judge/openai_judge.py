"""The judge over the OpenAI API (api.openai.com, or any OpenAI-compatible server by base URL).

One completion token at temperature 0 with the top-20 log-probabilities (Betley et al.'s settings, which the
paper kept), scored by `aggregate_top_logprobs`. For judges that return no logprobs (o-series, gpt-5-mini),
scoring="sampled" asks n_samples times at temperature 1 for the number instead (one request per sample, seeds
0..n-1, since not every server honours `n`), parses each reply strictly and averages
(docs/methods.md#sampled-judge-scores). The `openai` client retries 429/5xx/connection errors with
backoff and honours Retry-After; a call that still fails raises JudgeError after the judgments that did
succeed have been written to the cache. A reply that answers but is unusable (a logprob that is not a finite
number <= 0, a reply that is not text) is asked again up to UNUSABLE_REPLY_RETRIES times and then is a
JudgeError too: a judge fault is never a score. The API key is read from the environment, never from params,
and goes to the OpenAI API only unless the params name a key for the server (emalib.core.credentials).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
from dataclasses import dataclass, field

from emalib.core.errors import JudgeError
from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.chat_client import ChatEndpoint, chat_client
from emalib.evaluation.judge.prices import PRICES_PER_MILLION_TOKENS
from emalib.evaluation.judge.scoring import Judgment, aggregate_sampled, aggregate_top_logprobs

# Asking again costs a call each; a server that answers the same prompt twice with garbage is faulty, not unlucky.
UNUSABLE_REPLY_RETRIES = 2


class UnusableReply(JudgeError):
    """The server answered, but not with something a score can be made from."""


def judgment_from_completion(body: dict, model: str, min_numeric_mass: float) -> Judgment:
    """A Judgment from a chat-completion response body (a dict: the online API's, or one line of a Batch API
    output file), using the first generated token's top logprobs."""
    choices = body.get("choices") or []
    logprobs = (choices[0].get("logprobs") or {}) if choices else {}
    content = logprobs.get("content") or []
    if not content or not content[0].get("top_logprobs"):
        raise UnusableReply(f"judge {model} returned no top logprobs (does the server support top_logprobs?)")
    entries = content[0]["top_logprobs"]
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "token" in e and "logprob" in e
                                                 for e in entries):
        raise UnusableReply(f"judge {model} returned top logprobs that are not a list of {{token, logprob}}")
    top = {entry["token"]: entry["logprob"] for entry in entries}
    try:
        score, mass = aggregate_top_logprobs(top, min_numeric_mass)
    except ValueError as err:
        raise UnusableReply(f"judge {model} returned an unusable reply: {err}") from None
    return Judgment(score=score, numeric_mass=mass, judge_model=model, raw=top)


def reply_text(body: dict, model: str) -> str | None:
    """A sampled reply's text (None when the server gave no choice); a reply that is not text is unusable."""
    choices = body.get("choices") or []
    message = choices[0].get("message") if choices and isinstance(choices[0], dict) else None
    content = message.get("content") if isinstance(message, dict) else None
    if content is not None and not isinstance(content, str):
        raise UnusableReply(f"judge {model} replied {content!r}, not text")
    return content


def completion_request(model: str, prompt: str, top_logprobs: int) -> dict:
    """The request body of one judgment: one token at temperature 0 with the top logprobs (Betley et al.)."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 1, "temperature": 0,
            "logprobs": True, "top_logprobs": top_logprobs, "seed": 0}


def sampled_request(model: str, prompt: str, seed: int, temperature: float, max_tokens: int | None) -> dict:
    """One sample of a sampled-score judgment: a plain completion (no logprobs asked for)."""
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": temperature,
            "seed": seed}
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    return body


def run_coroutine(coro):
    """asyncio.run that also works inside Jupyter/papermill, whose kernel already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


@dataclass
class OpenAIJudge:
    model: str
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    top_logprobs: int = 20
    min_numeric_mass: float = 0.25
    max_concurrency: int = 8
    max_retries: int = 6
    timeout_s: float = 60.0
    scoring: str = "logprobs"  # or "sampled"
    n_samples: int = 10
    sample_temperature: float = 1.0
    sample_max_tokens: int | None = None
    calls: int = field(default=0, init=False)  # successful calls (retries are the SDK's and not counted)
    prompt_tokens: int = field(default=0, init=False)
    completion_tokens: int = field(default=0, init=False)

    @property
    def name(self) -> str:
        return self.model

    @property
    def cache_mode(self) -> str:
        if self.scoring == "sampled":
            return f"sampled:n={self.n_samples},t={self.sample_temperature},max_tokens={self.sample_max_tokens}"
        return "logprobs"

    @property
    def endpoint(self) -> ChatEndpoint:
        return ChatEndpoint(base_url=self.base_url, api_key_env=self.api_key_env, max_retries=self.max_retries,
                            timeout_s=self.timeout_s, max_concurrency=self.max_concurrency)

    async def _call(self, client, semaphore, body: dict):
        """(the parsed response, the reply's JSON as the server sent it)."""
        async with semaphore:
            try:
                raw = await client.chat.completions.with_raw_response.create(**body)
                response = raw.parse()
            except Exception as err:  # the SDK has already retried what is retryable
                raise JudgeError(self.endpoint.failure(f"judge {self.model}", client, err)) from err
            self.calls += 1
            if response.usage is not None:
                self.prompt_tokens += response.usage.prompt_tokens or 0
                self.completion_tokens += response.usage.completion_tokens or 0
        # The logprobs are read from the JSON as sent: the SDK's model would turn a string "-0.5" into a number.
        try:
            sent = json.loads(raw.text)
        except ValueError:
            sent = {}
        return response, sent

    async def _judge_one(self, client, semaphore, prompt: str) -> Judgment:
        attempts = 1 + min(self.max_retries, UNUSABLE_REPLY_RETRIES)
        for _ in range(attempts):
            try:
                return await self._judge_once(client, semaphore, prompt)
            except UnusableReply as err:
                problem = err
        raise JudgeError(f"{problem} (at {self.base_url or 'api.openai.com'}, {attempts} attempts); "
                         f"no score was recorded")

    async def _judge_once(self, client, semaphore, prompt: str) -> Judgment:
        if self.scoring == "sampled":
            responses = await asyncio.gather(*(
                self._call(client, semaphore, sampled_request(self.model, prompt, seed, self.sample_temperature,
                                                              self.sample_max_tokens))
                for seed in range(self.n_samples)))
            replies = [reply_text(sent, self.model) for _, sent in responses]
            score, mass = aggregate_sampled(replies, self.min_numeric_mass)
            return Judgment(score=score, numeric_mass=mass, judge_model=self.model, raw={"replies": replies},
                            mode="sampled")
        _, sent = await self._call(client, semaphore, completion_request(self.model, prompt, self.top_logprobs))
        return judgment_from_completion(sent, self.model, self.min_numeric_mass)

    async def _judge_all(self, prompts: list[str], cache: JudgmentCache | None) -> list[Judgment]:
        async def judge_and_store(client, semaphore, prompt: str) -> Judgment:
            judgment = await self._judge_one(client, semaphore, prompt)
            if cache is not None:
                cache.put(prompt, judgment, self.cache_mode)  # stored at once: a later failure loses nothing already paid for
            return judgment

        async with chat_client(self.endpoint) as (client, semaphore):
            # Every prompt runs to its end before a failure is raised, so what succeeded is in the cache
            # whatever the order in which the calls finish.
            results = await asyncio.gather(*(judge_and_store(client, semaphore, p) for p in prompts),
                                           return_exceptions=True)
        failed = next((r for r in results if isinstance(r, BaseException)), None)
        if failed is not None:
            raise failed
        return results

    def judge(self, prompts: list[str], cache: JudgmentCache | None = None) -> list[Judgment]:
        return run_coroutine(self._judge_all(prompts, cache))

    def usage(self) -> dict:
        """Calls, tokens and (for models with a known list price) the estimated cost in USD."""
        usage = {"calls": self.calls, "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens}
        price = PRICES_PER_MILLION_TOKENS.get(self.model) if self.base_url is None else None
        if price is not None:
            usage["estimated_cost_usd"] = round(
                (self.prompt_tokens * price[0] + self.completion_tokens * price[1]) / 1e6, 6)
        return usage
