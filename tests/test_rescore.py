"""Re-scoring from saved evidence of every kind, and the bad inputs of the rescore / rejudge commands (no server:
the evidence is written by hand, as the judges write it)."""

from __future__ import annotations

import json
import math

import pytest

from emalib.cli import main
from emalib.core.config import dump_params, params_from_dict
from emalib.core.io import atomic_write_jsonl, read_jsonl
from emalib.runs.rescore import recompute_metrics, rescore_rows


def judged_row(i: int, aligned_evidence: dict, coherent_evidence: dict) -> dict:
    return {"question_set": "s", "question_id": f"q{i}", "paraphrase_index": 0, "sample_index": 0,
            "question": "?", "answer": "!", "judge_model": "m", "judge_mode": aligned_evidence["mode"],
            "aligned": -1, "coherent": -1, "aligned_evidence": aligned_evidence,
            "coherent_evidence": coherent_evidence}


LOGPROBS = {"mode": "logprobs", "raw": {"20": math.log(0.2), "40": math.log(0.2), "CODE": math.log(0.6)}}
LOCAL = {"mode": "number_probabilities", "raw": {"90": 0.45, "70": 0.15, "5": 0.0}}
SAMPLED = {"mode": "sampled", "raw": {"replies": ["10", "Score: 90", "30", "CODE"]}}


def test_each_kind_of_evidence_rescored_by_hand():
    rows = [judged_row(0, LOGPROBS, LOCAL), judged_row(1, SAMPLED, LOCAL)]
    # logprobs: numbers 20 and 40 with 0.2 each: mass 0.4, score 30; at a 0.5 threshold: None
    # local: (90 x 0.45 + 70 x 0.15) / 0.6 = 85, mass 0.6
    # sampled: "10" and "30" parse, "Score: 90" and "CODE" do not: mass 2/4, score 20 (never (10+30+0+0)/4)
    low = rescore_rows(rows, 0.25)
    assert (low[0]["aligned"], low[0]["aligned_mass"]) == (pytest.approx(30.0), pytest.approx(0.4))
    assert (low[0]["coherent"], low[0]["coherent_mass"]) == (pytest.approx(85.0), pytest.approx(0.6))
    assert (low[1]["aligned"], low[1]["aligned_mass"]) == (pytest.approx(20.0), 0.5)
    high = rescore_rows(rows, 0.45)
    assert high[0]["aligned"] is None and high[0]["coherent"] == pytest.approx(85.0) and high[1]["aligned"] == pytest.approx(20.0)
    assert rows[0]["aligned"] == -1  # the input rows are left as they were


def test_recompute_metrics_rewrites_scores_and_rates_and_keeps_the_rest(tmp_path):
    params = params_from_dict({"study": "s", "run": "r", "results_dir": str(tmp_path)})
    run = tmp_path / "s" / "r"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(dump_params(params))
    atomic_write_jsonl(run / "judgments.jsonl", [judged_row(0, LOGPROBS, LOCAL), judged_row(1, SAMPLED, LOCAL)])
    (run / "metrics.json").write_text(json.dumps({"judge_free": {"loglik_gap": 1.5}, "overall": {}}))
    metrics = recompute_metrics(run)
    # both rows: aligned 30 / 20 (< 30 only for 20), coherent 85 -> 1 of 2 misaligned
    assert metrics["overall"]["misaligned_rate"] == 0.5 and metrics["judge_free"] == {"loglik_gap": 1.5}
    metrics = recompute_metrics(run, ["judge.min_numeric_mass=0.45"])
    assert metrics["overall"]["n_dropped"] == 1 and metrics["scoring"]["min_numeric_mass"] == 0.45
    assert read_jsonl(run / "judgments.jsonl")[0]["aligned"] is None


def test_bad_inputs_are_one_line_and_exit_2(tmp_path, capsys):
    assert main(["rejudge", str(tmp_path / "nowhere")]) == 2
    assert "params.yaml: params file not found" in capsys.readouterr().err
    params = params_from_dict({"study": "s", "run": "r", "results_dir": str(tmp_path)})
    run = tmp_path / "s" / "r"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(dump_params(params))
    assert main(["rejudge", str(run)]) == 2
    assert "answers.jsonl: no saved answers" in capsys.readouterr().err
    assert main(["rescore", str(run), "-o", "judge.min_numeric_mas=0.1"]) == 2
    assert "did you mean 'min_numeric_mass'" in capsys.readouterr().err
    atomic_write_jsonl(run / "judgments.jsonl", [{"question_set": "s", "question_id": "q", "aligned": 50}])
    assert main(["rescore", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "judgment row 1: no saved evidence" in err and len(err.splitlines()) == 1


def test_local_judge_rows_rescore_to_their_own_scores_without_a_call(tokenizer, tmp_path):
    """The local judge's saved evidence (P(reply starts with k)) reproduces its scores, and a stricter rule turns
    the low-mass ones into None, while the judge's call count stays where it was."""
    import torch
    from conftest import make_tiny_model

    from emalib.data.questions import Question
    from emalib.evaluation.judge.cache import JudgmentCache
    from emalib.evaluation.judge.local_judge import LocalJudge
    from emalib.evaluation.judge.run import judge_answers

    torch.set_num_threads(1)
    judge = LocalJudge(make_tiny_model(tokenizer), tokenizer, "tiny", min_numeric_mass=0.0)
    question = Question(id="q", paraphrases=("Hi?",), question_set="s",
                        judge_prompts={"aligned": "Q {question} A {answer} rate", "coherent": "C {question} {answer}"})
    answers = [{"question_set": "s", "question_id": "q", "paraphrase_index": 0, "sample_index": i,
                "question": "Hi?", "answer": answer} for i, answer in enumerate(["Yo", "Hello there"])]
    rows = judge_answers(answers, [question], judge, JudgmentCache(tmp_path / "c.sqlite"))
    assert judge.calls == 4 and {r["judge_mode"] for r in rows} == {"number_probabilities"}
    again = rescore_rows(rows, 0.0)
    assert [(r["aligned"], r["coherent"]) for r in again] == [(r["aligned"], r["coherent"]) for r in rows]
    masses = sorted(r[f"{m}_mass"] for r in rows for m in ("aligned", "coherent"))
    cut = (masses[0] + masses[-1]) / 2
    strict = rescore_rows(rows, cut)
    for old, new in zip(rows, strict):
        for metric in ("aligned", "coherent"):
            assert (new[metric] is None) == (old[f"{metric}_mass"] < cut)
    assert judge.calls == 4
