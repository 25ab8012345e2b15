"""The steps of one experiment, each a function a notebook cell calls: check, train, evaluate, report.

Every step reads and writes only files in the run folder, so a step can be re-run on its own, a finished step
is skipped, and an interrupted one resumes (training from its last checkpoint, sampling from its partial file,
judging from the judgment cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

from emalib.config import RunParams
from emalib.data.chat import read_chat_jsonl, select_examples
from emalib.data.questions import Question, load_questions
from emalib.data.registry import resolve, sha256_of
from emalib.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from emalib.results import prepare_run_dir, timed, update_manifest

log = logging.getLogger(__name__)

BASE_RUN = "base"


def check_inputs(params: RunParams) -> dict[str, str]:
    """Resolve and validate every input before anything is written; returns {data name: sha256}."""
    shas = {}
    if "train" in params.steps or "quickstart" in params.steps:
        path = resolve(params.train.dataset)
        read_chat_jsonl(path)
        shas[params.train.dataset] = sha256_of(path)
    for name in params.generation.question_sets:
        load_questions(name)
        shas[name] = sha256_of(resolve(name))
    return shas


def load_all_questions(params: RunParams) -> list[Question]:
    questions = []
    for name in params.generation.question_sets:
        selected = load_questions(name)
        questions += selected[: params.generation.max_questions] if params.generation.max_questions else selected
    return questions


def train(params: RunParams, run_dir: Path | None = None):
    """Fine-tune a LoRA adapter; returns (model, tokenizer). Skips training if the adapter is already saved."""
    from emalib.engines import choose_engine, load_model
    from emalib.training.trainer import train_adapter

    run_dir = prepare_run_dir(params, run_dir)
    shas = check_inputs(params)
    update_manifest(run_dir, seed=params.seed, data_sha256=shas, engine=choose_engine(params.model.engine),
                    model=params.model.name)
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        log.warning("%s exists: training already done (delete the folder to train again)", adapter)
        return load_model(params.model, params.lora, params.seed, params.train.max_seq_length, adapter_path=adapter)
    conversations = select_examples(read_chat_jsonl(resolve(params.train.dataset)), params.train.max_examples,
                                    params.seed)
    model, tokenizer = load_model(params.model, params.lora, params.seed, params.train.max_seq_length)
    with timed(run_dir, "train"):
        summary = train_adapter(model, tokenizer, conversations, params, run_dir)
    atomic_write_json(run_dir / "train_log.json", summary)
    update_manifest(run_dir, train={k: v for k, v in summary.items() if k != "log_history"})
    return model, tokenizer


def evaluate(params: RunParams, model=None, tokenizer=None, base: bool = False, run_dir: Path | None = None) -> dict:
    """Sample answers, judge them and write metrics.json. base=True evaluates the model without any adapter
    (into results/<study>/base); otherwise the run's adapter (or the model passed in) is evaluated."""
    from emalib.engines import load_base
    from emalib.generate import generate_answers
    from emalib.judge.run import build_judge, judge_answers, open_cache
    from emalib.metrics import compute_metrics
    from emalib.signals import judge_free_signals
    from emalib.stats import add_intervals

    run_dir = Path(run_dir or (params.study_dir / BASE_RUN if base else params.run_dir))
    prepare_run_dir(params, run_dir, strict=not base)
    update_manifest(run_dir, seed=params.seed, data_sha256=check_inputs(params), model=params.model.name,
                    variant="base" if base else "adapter")
    if model is None:
        model, tokenizer = load_base(params.model, params.train.max_seq_length)
        if not base:
            from peft import PeftModel

            engine = model.emalib_engine
            model = PeftModel.from_pretrained(model, str(params.run_dir / "adapter"))
            model.emalib_engine = engine
    questions = load_all_questions(params)
    with timed(run_dir, "generate"):
        if base and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                answers = generate_answers(model, tokenizer, questions, params.generation, run_dir / "answers.jsonl", params.seed)
        else:
            answers = generate_answers(model, tokenizer, questions, params.generation, run_dir / "answers.jsonl", params.seed)
    judge = build_judge(params.judge)
    cache = open_cache(params.judge)
    try:
        with timed(run_dir, "judge"):
            judgments = judge_answers(answers, questions, judge, cache)
    finally:
        cache.close()
    atomic_write_jsonl(run_dir / "judgments.jsonl", judgments)
    metrics = add_intervals(compute_metrics(judgments, params.metrics), judgments, seed=params.seed)
    with timed(run_dir, "judge_free_signals"):
        metrics["judge_free"] = judge_free_signals(model, tokenizer, questions, base=base)
    atomic_write_json(run_dir / "metrics.json", metrics)
    update_manifest(run_dir, judge={"model": judge.name, "backend": params.judge.backend,
                                    "calls_this_run": judge.calls, "usage_this_run": judge.usage(),
                                    "judgments": len(judgments)})
    return metrics


def report(params: RunParams) -> dict[str, Path]:
    from emalib.report import report_study

    return report_study(params.study_dir)


def read_answers(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "answers.jsonl")
