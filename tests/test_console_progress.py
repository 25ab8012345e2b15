"""Progress in real units from a kernel to the CLI's console: the bars' states written to a file
(emalib.core.progress), drawn from it (emalib.runs.console_progress), and the sampling bar moving answer by
answer. The console of a real `python -m emalib run` is tested in test_cli_and_notebooks.py."""

from __future__ import annotations

import io
import json

import torch

from emalib.core.config import GenerationParams
from emalib.core.progress import PROGRESS_FILE_ENV, Progress, progress
from emalib.data.questions import Question
from emalib.runs.console_progress import ProgressDrawer, drawn_progress


def states(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_bar_reports_its_state_and_its_end_to_the_named_file(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    monkeypatch.setattr("emalib.core.progress.REPORT_EVERY_S", 0.0)  # every update written
    with progress(5, "sampling sft", "answers", initial=1) as bar:
        bar.update(2)
        bar.set_postfix({"calls": 3})
        bar.update(2)
    written = states(path)
    assert [s["n"] for s in written] == [1, 3, 5, 5]
    assert [s["closed"] for s in written] == [False, False, False, True]
    assert {s["unit"] for s in written} == {"answers"} and {s["total"] for s in written} == {5}
    assert written[-1]["postfix"] == {"calls": "3"} and len({s["id"] for s in written}) == 1


def test_updates_are_throttled_but_the_end_is_always_written(tmp_path, monkeypatch):
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    monkeypatch.setattr("emalib.core.progress.REPORT_EVERY_S", 3600.0)
    with progress(100, "judging", "judgments") as bar:
        for _ in range(100):
            bar.update(1)
    assert [(s["n"], s["closed"]) for s in states(path)] == [(0, False), (100, False), (100, True)]


def test_no_file_is_written_when_none_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    with progress(3, "x", "steps") as bar:
        bar.update(3)
    assert list(tmp_path.iterdir()) == []


def test_the_drawer_draws_each_bar_in_its_units_and_waits_for_a_line_to_end(tmp_path):
    path = tmp_path / "progress.jsonl"
    out = io.StringIO()
    drawer = ProgressDrawer(path, out)
    drawer.poll()  # no file yet: nothing
    first = {"id": "a", "desc": "sampling sft", "unit": "answers", "total": 24, "n": 6, "postfix": {},
             "closed": False}
    whole = json.dumps(first) + "\n"
    path.write_text(whole + json.dumps(dict(first, n=12))[:15])  # the second line is still being written
    drawer.poll()
    assert "6/24 answers" in out.getvalue() and drawer.bars["a"].n == 6
    with open(path, "a") as sink:
        sink.write(json.dumps(dict(first, n=12))[15:] + "\n" + json.dumps(dict(first, n=24, closed=True)) + "\n")
        sink.write(json.dumps({"id": "b", "desc": "judging (local)", "unit": "judgments", "total": 48, "n": 0,
                               "postfix": {"calls": "0"}, "closed": False}) + "\n")
    drawer.poll()
    shown = out.getvalue()
    assert "24/24 answers" in shown and "0/48 judgments" in shown and "calls=0" in shown
    assert list(drawer.bars) == ["b"]  # the closed bar is gone
    drawer.close()
    assert drawer.bars == {}


def test_drawn_progress_names_the_file_for_kernels_and_removes_it(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    monkeypatch.delenv("EMALIB_PROGRESS", raising=False)
    with drawn_progress(tmp_path):
        import os

        named = os.environ[PROGRESS_FILE_ENV]
        bar = Progress(3, "training sft", "steps")  # as the kernel would, with the inherited variable
        bar.update(3)
        bar.close()
    assert named == str((tmp_path / ".progress.jsonl").resolve())
    assert PROGRESS_FILE_ENV not in os.environ and not (tmp_path / ".progress.jsonl").exists()
    assert "3/3 steps" in capsys.readouterr().out


def test_the_finished_counter_counts_each_answer_once_at_its_first_stop_token():
    from emalib.evaluation.generate import _CountFinished

    counted = []
    counter = _CountFinished([2], prompt_length=3, on_finished=counted.append)
    prompt = torch.tensor([[5, 6, 7], [5, 6, 7], [5, 6, 7]])
    tokens = [[9, 2, 2], [9, 9, 2], [2, 2, 2]]  # row 2 ends first, row 0 next, row 1 last (then padding by 2)
    for step in range(1, 4):
        ids = torch.cat([prompt, torch.tensor(tokens)[:, :step]], dim=1)
        assert not counter(ids, None).any()  # never stops generation itself
    assert counted == [1, 1, 1]


def test_sampling_reports_every_answer_and_keeps_the_answers(tmp_path, monkeypatch, tiny_model, tokenizer):
    from emalib.evaluation.generate import generate_answers

    questions = [Question(id="q", paraphrases=("Name a colour.", "Name a fruit."), judge_prompts={},
                          question_set="s")]
    params = GenerationParams(samples_per_question=3, max_new_tokens=4, batch_size=4)
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    plain = generate_answers(tiny_model, tokenizer, questions, params, tmp_path / "a" / "answers.jsonl", seed=1)
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    reported = generate_answers(tiny_model, tokenizer, questions, params, tmp_path / "b" / "answers.jsonl", seed=1)
    assert [r["answer"] for r in reported] == [r["answer"] for r in plain]  # counting changes no answer
    written = states(path)
    assert written[0]["desc"] == "sampling b" and written[0]["unit"] == "answers" and written[0]["total"] == 6
    assert written[-1]["closed"] and written[-1]["n"] == 6
    assert [s["n"] for s in written] == sorted(s["n"] for s in written)


def test_persona_extraction_sampling_reports_every_answer_and_keeps_the_answers(tmp_path, monkeypatch, tiny_model,
                                                                                  tokenizer):
    from emalib.evaluation.persona import generate_rows

    rows = [{"system": "You are helpful.", "question": q, "instruction_index": 0, "question_index": i,
             "sample_index": 0} for i, q in enumerate(["Name a colour.", "Name a fruit.", "Name a tree."])]
    monkeypatch.delenv(PROGRESS_FILE_ENV, raising=False)
    plain = generate_rows(tiny_model, tokenizer, rows, max_new_tokens=4, temperature=1.0, batch_size=2, seed=3)
    path = tmp_path / "progress.jsonl"
    monkeypatch.setenv(PROGRESS_FILE_ENV, str(path))
    reported = generate_rows(tiny_model, tokenizer, rows, max_new_tokens=4, temperature=1.0, batch_size=2, seed=3)
    assert [r["answer"] for r in reported] == [r["answer"] for r in plain]  # counting changes no answer
    written = states(path)
    assert written[0]["desc"] == "persona extraction: sampling" and written[0]["total"] == 3
    assert written[-1]["closed"] and written[-1]["n"] == 3
    assert [s["n"] for s in written] == sorted(s["n"] for s in written)


def test_a_timed_step_records_its_wall_clock_and_cpu_seconds(tmp_path):
    # A fresh process: process_time counts every thread, and threads left by earlier tests (torch, Ray) would add
    # their CPU seconds to the steps measured here.
    import subprocess
    import sys
    import textwrap

    from emalib.runs.results import read_manifest

    script = textwrap.dedent(f"""
        import time
        from pathlib import Path
        from emalib.runs.results import timed

        run_dir = Path({str(tmp_path)!r})
        with timed(run_dir, "busy"):
            end_cpu, end_wall = time.process_time() + 0.2, time.perf_counter() + 0.2
            while time.process_time() < end_cpu or time.perf_counter() < end_wall:  # 0.2 s of CPU and of wall clock
                pass
        with timed(run_dir, "idle"):
            time.sleep(0.3)  # wall clock only
    """)
    subprocess.run([sys.executable, "-c", script], check=True)
    manifest = read_manifest(tmp_path)
    assert manifest["cpu_s"]["busy"] >= 0.2 and manifest["timings_s"]["busy"] >= 0.2
    assert manifest["timings_s"]["idle"] >= 0.3 and manifest["cpu_s"]["idle"] < 0.1
