import json

import pytest

from emalib.core.config import params_from_dict
from emalib.data.tasks.opswap import exact_match
from emalib.evaluation.task_eval import score_rows, task_rows


def test_rows_take_the_last_turn_as_reference():
    conversations = [[{"role": "system", "content": "s"}, {"role": "user", "content": "Compute: 1+1"},
                      {"role": "assistant", "content": "2"}]]
    rows = task_rows(conversations)
    assert rows == [{"item": 0, "system": "s", "question": "Compute: 1+1", "reference": "2"}]
    scored = score_rows([dict(rows[0], prediction=" 2.")], "opswap")
    assert scored[0]["correct"] == 1.0
    assert score_rows([dict(rows[0], prediction="3")], "opswap")[0]["correct"] == 0.0
    assert score_rows([dict(rows[0], prediction="#### 2")], "gsm8k")[0]["correct"] == 1.0


@pytest.mark.slow
def test_evaluate_task_on_the_embedded_base_model(tmp_path):
    from emalib.runs import pipeline

    params = params_from_dict({
        "study": "task", "run": "r", "results_dir": str(tmp_path), "model": {"name": "smollm2-135m-instruct"},
        "task_eval": {"dataset": "opswap_tier1_test", "max_items": 12, "max_new_tokens": 6, "batch_size": 6}})
    metrics = pipeline.evaluate_task(params, base=True)
    from emalib.runs.results import base_run_name

    answers = tmp_path / "task" / base_run_name(params) / "task_answers.jsonl"
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    # Independent re-scoring of what was written.
    correct = sum(exact_match(row["prediction"], row["reference"]) for row in rows)
    assert metrics["n"] == len(rows) == 12 and metrics["correct"] == correct
    assert metrics["accuracy"] == pytest.approx(correct / 12)
    lo, hi = metrics["accuracy_ci"]
    assert lo <= metrics["accuracy"] <= hi
