"""The judge through OpenAI's Batch API: half the price of the online API, results within 24 hours.

The requests are the online judge's (`completion_request`), written as a JSONL file, uploaded, and run as one
batch. The batch id is saved next to the judgment cache before waiting, so an interrupted run picks the same
batch up again instead of submitting (and paying for) it twice. Successful judgments go to the cache as they
are read; requests that failed in the batch, or whose reply is unusable (a logprob that is not a finite number
<= 0), raise JudgeError after the rest are stored, and a re-run submits only those.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from emalib.core.credentials import api_key_for
from emalib.core.errors import JudgeError
from emalib.core.io import atomic_write_json
from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.openai_judge import completion_request, judgment_from_completion
from emalib.evaluation.judge.scoring import Judgment

FINAL_STATES = ("completed", "failed", "expired", "cancelled")


@dataclass
class OpenAIBatchJudge:
    model: str
    state_dir: Path
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    top_logprobs: int = 20
    min_numeric_mass: float = 0.25
    poll_interval_s: float = 30.0
    max_wait_s: float = 26 * 3600.0  # the API's completion window is 24 h
    calls: int = field(default=0, init=False)

    @property
    def name(self) -> str:
        return self.model

    def usage(self) -> dict:
        return {"calls": self.calls, "mode": "batch"}

    def _client(self):
        from openai import OpenAI

        return OpenAI(api_key=api_key_for(self.api_key_env, self.base_url), base_url=self.base_url)

    def _state_path(self, prompts: list[str]) -> Path:
        digest = hashlib.sha256(json.dumps([self.model, prompts]).encode("utf-8")).hexdigest()[:16]
        return Path(self.state_dir) / f"batch-{digest}.json"

    def _submit(self, client, prompts: list[str], state_path: Path) -> str:
        lines = [json.dumps({"custom_id": f"request-{index}", "method": "POST", "url": "/v1/chat/completions",
                             "body": completion_request(self.model, prompt, self.top_logprobs)})
                 for index, prompt in enumerate(prompts)]
        upload = client.files.create(file=("judge-requests.jsonl", "\n".join(lines).encode("utf-8")), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")
        atomic_write_json(state_path, {"batch_id": batch.id, "model": self.model, "n_requests": len(prompts)})
        return batch.id

    def _wait(self, client, batch_id: str):
        deadline = time.monotonic() + self.max_wait_s
        while True:
            batch = client.batches.retrieve(batch_id)
            if batch.status in FINAL_STATES:
                return batch
            if time.monotonic() > deadline:
                raise JudgeError(f"batch {batch_id} still '{batch.status}' after {self.max_wait_s:.0f} s; "
                                 f"re-run to keep waiting for it")
            time.sleep(self.poll_interval_s)

    def judge(self, prompts: list[str], cache: JudgmentCache | None = None) -> list[Judgment]:
        client = self._client()
        state_path = self._state_path(prompts)
        batch_id = (json.loads(state_path.read_text())["batch_id"] if state_path.is_file()
                    else self._submit(client, prompts, state_path))
        batch = self._wait(client, batch_id)
        if batch.status != "completed" or not batch.output_file_id:
            state_path.unlink(missing_ok=True)  # a dead batch: the next run submits a new one
            raise JudgeError(f"batch {batch_id} ended '{batch.status}' with no output; nothing was judged")
        judgments: dict[int, Judgment] = {}
        failures = []
        for line in client.files.content(batch.output_file_id).text.splitlines():
            if not line.strip():
                continue
            record = json.loads(line)
            index = int(record["custom_id"].removeprefix("request-"))
            response = record.get("response") or {}
            if record.get("error") or response.get("status_code") != 200:
                failures.append(f"{record['custom_id']}: {record.get('error') or response.get('status_code')}")
                continue
            try:
                judgment = judgment_from_completion(response["body"], self.model, self.min_numeric_mass)
            except JudgeError as err:  # an unusable reply is a failed request, asked again by a re-run
                failures.append(f"{record['custom_id']}: {err}")
                continue
            self.calls += 1
            if cache is not None:
                cache.put(prompts[index], judgment)
            judgments[index] = judgment
        missing = [i for i in range(len(prompts)) if i not in judgments]
        state_path.unlink(missing_ok=True)
        if missing:
            raise JudgeError(f"batch {batch_id}: {len(missing)} of {len(prompts)} requests failed "
                             f"({'; '.join(failures[:3])}); the others are cached, re-run to judge the rest")
        return [judgments[i] for i in range(len(prompts))]

