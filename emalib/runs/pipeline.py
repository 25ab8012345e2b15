"""The steps of one experiment, each a function a notebook cell calls: check, train, rl, evaluate.

Every step reads and writes only files in the run folder, so a step can be re-run on its own, a finished step
is skipped, and an interrupted one resumes (training from its last checkpoint, sampling from its partial file,
judging from the judgment cache).
"""

from __future__ import annotations

import logging
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.io import atomic_write_json, atomic_write_jsonl, read_jsonl
from emalib.core.launch import refuse_multi_process
from emalib.core.names import inside
from emalib.data.chat import read_chat_jsonl, select_examples
from emalib.data.heldout import (
    heldout_judge_set,
    heldout_record,
    heldout_seed,
    in_domain_judge_prompts,
    load_heldout_questions,
    split_heldout,
)
from emalib.data.questions import Question, load_questions
from emalib.data.registry import resolve, sha256_of
from emalib.runs.prepared import check_prepared
from emalib.runs.results import base_run_name, prepare_run_dir, timed, update_manifest

log = logging.getLogger(__name__)


def _before_model_step(params: RunParams) -> None:
    """Before any import of transformers, peft or trl (Unsloth patches them when it is imported first); a
    multi-process launch is refused first."""
    from emalib.model.engines import import_engine_first

    refuse_multi_process()
    import_engine_first(params.model.engine)


def check_inputs(params: RunParams, steps: tuple[str, ...] | None = None,
                 run_dir: Path | None = None) -> dict[str, str]:
    """Resolve and validate every input the steps (default: the params' steps, in order) read, before anything is
    written or loaded, prepared inputs of training included (`emalib.runs.prepared.check_prepared`); returns
    {data name: sha256}. run_dir: the run folder, if not the params' own."""
    order = tuple(params.steps if steps is None else steps)
    steps = set(order)
    shas = {}
    if {"train", "quickstart", "interleave_selection"} & steps:  # the selection is sized by the task set
        path = resolve(params.train.dataset)
        read_chat_jsonl(path)
        shas[params.train.dataset] = sha256_of(path)
    if {"evaluate", "evaluate_base", "quickstart"} & steps:
        for name in evaluation_question_sets(params):
            load_questions(name)
            shas[name] = sha256_of(resolve(name))
        if params.train.heldout is not None and "evaluate" in steps:
            name = heldout_judge_set(params)
            in_domain_judge_prompts(name)
            shas[name] = sha256_of(resolve(name))
            shas[params.train.dataset] = sha256_of(resolve(params.train.dataset))
        if params.task_eval.dataset is not None:
            path = resolve(params.task_eval.dataset)
            read_chat_jsonl(path)
            shas[params.task_eval.dataset] = sha256_of(path)
    if "rl" in steps and params.rl is not None:
        shas.update(_check_rl_inputs(params))
    if {"train", "rl", "quickstart", "persona_vector", "interleave_selection", "caft_directions"} & steps:
        for spec in params.defenses:  # e.g. the interleaving pool, the persona trait file
            if spec.name == "persona_steering" and "persona_vector" not in steps:
                continue  # training reads the extracted vector, not the extraction's inputs
            _check_defense_inputs(spec)
            for name in spec.data_sources:
                shas[name] = sha256_of(resolve(name))
    check_prepared(params, order, Path(run_dir or params.run_dir))
    return shas


def _check_defense_inputs(spec) -> None:
    """Parse what a defense will read, so a malformed file fails here and not inside a notebook."""
    if spec.name.startswith("interleave") or spec.name == "kl_retain":
        read_chat_jsonl(resolve(spec.source))
    elif spec.name == "caft":  # the given files; a directions file the caft_directions step writes is checked later
        from emalib.defenses.caft import check_caft_files

        check_caft_files(None if spec.adapter is not None else spec.directions_path, spec.persona_vector_path)
    elif spec.name == "early_stopping" and spec.validation_dataset:
        read_chat_jsonl(resolve(spec.validation_dataset))
    elif spec.name == "persona_steering" and spec.data_sources:  # only when the vector must be extracted
        from emalib.evaluation.persona import load_trait

        load_trait(spec.extraction.trait)
        if spec.extraction.filter_pairs:
            load_questions(spec.extraction.coherence_questions)


def evaluation_question_sets(params: RunParams) -> list[str]:
    """The params' question sets, plus with generation.trigger_probes the trigger variants of those that have
    them (emalib.data.triggers)."""
    from emalib.data.triggers import with_trigger_probes

    return with_trigger_probes(params.generation.question_sets, params.generation.trigger_probes)


def _check_rl_inputs(params: RunParams) -> dict[str, str]:
    """Parse the rl step's prompts, SFT-mix data and warm-start data; {name: sha256}."""
    from emalib.data.rl_prompts import read_prompt_rows

    path = resolve(params.rl.prompts)
    read_prompt_rows(path)
    shas = {params.rl.prompts: sha256_of(path)}
    for name in [spec.source for spec in (params.rl.sft_mix,) if spec] + \
            [spec.dataset for spec in (params.rl.warm_start,) if spec]:
        read_chat_jsonl(resolve(name))
        shas[name] = sha256_of(resolve(name))
    return shas


def load_all_questions(params: RunParams) -> list[Question]:
    questions = []
    for name in evaluation_question_sets(params):
        selected = load_questions(name)
        questions += selected[: params.generation.max_questions] if params.generation.max_questions else selected
    return questions


def training_conversations(params: RunParams) -> list:
    """The run's task data before any defense transform: the data set less its held-out split (train.heldout),
    subsampled to max_examples (seeded)."""
    conversations = read_chat_jsonl(resolve(params.train.dataset))
    if params.train.heldout is not None:
        conversations, _, _ = split_heldout(conversations, params.train.heldout.fraction, heldout_seed(params))
    return select_examples(conversations, params.train.max_examples, params.seed)


def train(params: RunParams, run_dir: Path | None = None):
    """Fine-tune a LoRA adapter with the run's defenses; returns (model, tokenizer). Skips training if the
    adapter is already saved.

    What the preparatory steps write (persona vector, Interleaving+ scores, SafeLoRA matrices) is read, never
    built: a missing one fails here, before anything is written or loaded, unless training is already done.
    Defense hooks, in order: data transforms on the conversations before tokenisation; then in train_adapter the
    setup, per-step loss terms and forward contexts (steering hooks exist only inside the training forward), and
    after_train (SafeLoRA) before the adapter is saved. What the defenses report goes to manifest.json under
    'defenses'.
    """
    _before_model_step(params)
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.model.engines import choose_engine, load_model
    from emalib.training.trainer import train_adapter

    shas = check_inputs(params, ("train",), run_dir)
    run_dir = prepare_run_dir(params, run_dir)
    update_manifest(run_dir, seed=params.seed, data_sha256=shas, engine=choose_engine(params.model.engine),
                    model=params.model.name)
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        log.warning("%s exists: training already done (delete the folder to train again)", adapter)
        return load_model(params.model, params.lora, params.seed, params.train.max_seq_length, adapter_path=adapter)
    if params.train.heldout is not None:
        record = heldout_record(params)
        atomic_write_json(run_dir / "heldout.json", record)
        update_manifest(run_dir, heldout={k: v for k, v in record.items() if k != "indices"})
    conversations = training_conversations(params)
    defenses = build_defenses(params.defenses)
    ctx = DefenseContext(seed=params.seed, run_dir=run_dir, params=params)
    if len(defenses):
        with timed(run_dir, "defense_data"):
            conversations = defenses.transform_data(conversations, ctx)
    model, tokenizer = load_model(params.model, params.lora, params.seed, params.train.max_seq_length)
    ctx.tokenizer = tokenizer
    with timed(run_dir, "train"):
        summary = train_adapter(model, tokenizer, conversations, params, run_dir, defenses=defenses, ctx=ctx)
    atomic_write_json(run_dir / "train_log.json", summary)
    update_manifest(run_dir, train={k: v for k, v in summary.items() if k != "log_history"})
    if len(defenses):
        update_manifest(run_dir, defenses={"names": defenses.names, **ctx.notes})
    return model, tokenizer


def rl(params: RunParams, run_dir: Path | None = None):
    """GRPO (TRL) on the rl block's prompts and rewards with the run's defenses, after the optional SFT warm start;
    returns (model, tokenizer). Skips training if the adapter is already saved; resumes from rl_checkpoints.

    Inoculation and the RL system prompt shape the prompts; persona steering acts at the training forward (and at
    the rollouts with during_rollouts); beta is the KL to the adapter-disabled model; rl.sft_mix interleaves SFT.
    Writes rl_rewards.csv, rl_rewards.png/.pdf and rl_log.json.
    """
    _before_model_step(params)
    from emalib.defenses.base import DefenseContext
    from emalib.defenses.registry import build_defenses
    from emalib.model.engines import choose_engine, load_model
    from emalib.training.rl.run import drop_long_prompts, rl_prompts, train_grpo, warm_start

    shas = check_inputs(params, ("rl",), run_dir)
    run_dir = prepare_run_dir(params, run_dir)
    update_manifest(run_dir, seed=params.seed, data_sha256=shas, engine=choose_engine(params.model.engine),
                    model=params.model.name, method="grpo")
    adapter = run_dir / "adapter"
    if (adapter / "adapter_config.json").is_file():
        log.warning("%s exists: RL training already done (delete the folder to train again)", adapter)
        return load_model(params.model, params.lora, params.seed, params.train.max_seq_length, adapter_path=adapter)
    defenses = build_defenses(params.defenses)
    ctx = DefenseContext(seed=params.seed, run_dir=run_dir, params=params)
    rows = rl_prompts(params)
    prompts = defenses.transform_data([row["prompt"] for row in rows], ctx)
    rows = [dict(row, prompt=prompt) for row, prompt in zip(rows, prompts)]
    warm_adapter = run_dir / "warm_start" / "adapter"
    model, tokenizer = load_model(params.model, params.lora, params.seed, params.train.max_seq_length,
                                  adapter_path=warm_adapter if warm_adapter.is_dir() else None)
    ctx.tokenizer = tokenizer
    if params.rl.warm_start is not None and not warm_adapter.is_dir():
        with timed(run_dir, "warm_start"):
            warm_start(model, tokenizer, params, run_dir)
    rows, dropped = drop_long_prompts(rows, tokenizer, params.rl.max_prompt_length)
    mix = params.rl.sft_mix
    safe = read_chat_jsonl(resolve(mix.source)) if mix is not None else None
    with timed(run_dir, "rl"):
        summary = train_grpo(model, tokenizer, rows, params, run_dir, defenses, ctx, safe)
    summary["prompts_dropped_too_long"] = dropped
    atomic_write_json(run_dir / "rl_log.json", summary)
    update_manifest(run_dir, rl={k: v for k, v in summary.items() if k != "log_history"})
    if len(defenses):
        update_manifest(run_dir, defenses={"names": defenses.names, **ctx.notes})
    # The trained object keeps TRL's patches (its greedy generate was measured to emit garbage after GRPO on CPU);
    # the saved adapter is what evaluation uses, so that is what is returned.
    del model
    return load_model(params.model, params.lora, params.seed, params.train.max_seq_length, adapter_path=adapter)


def evaluate(params: RunParams, model=None, tokenizer=None, base: bool = False, run_dir: Path | None = None) -> dict:
    """Sample answers, judge them and write metrics.json. base=True evaluates the model without any adapter
    (into results/<study>/base); otherwise the run's adapter (or the model passed in) is evaluated."""
    _before_model_step(params)
    from emalib.evaluation.generate import generate_answers
    from emalib.evaluation.generate_vllm import choose_backend
    from emalib.evaluation.judge.run import build_judge, judge_answers, open_cache
    from emalib.evaluation.signals import judge_free_signals
    from emalib.runs.rescore import metrics_of, scoring_record

    run_dir = _evaluation_dir(params, base, run_dir)
    update_manifest(run_dir, seed=params.seed, data_sha256=check_inputs(params, ("evaluate",)),
                    model=params.model.name, variant="base" if base else "adapter")
    questions = load_all_questions(params)
    heldout = [] if base else load_heldout_questions(params)  # the base model trained on nothing: nothing held out
    asked = questions + heldout
    # the prefix KV patch hooks the transformers model's projections; vLLM has no such hook
    if model is None and choose_backend(params.generation.backend) == "vllm" and not params.generation.patch_prefix_kv:
        from emalib.evaluation.generate_vllm import generate_answers_vllm
        from emalib.model.engines import resolve_model_name

        with timed(run_dir, "generate"):  # vLLM holds the GPU alone; the HF model is loaded after it is freed
            answers = generate_answers_vllm(resolve_model_name(params.model.name),
                                            None if base else params.run_dir / "adapter", asked,
                                            params.generation, run_dir / "answers.jsonl", params.seed,
                                            params.lora.r, params.train.max_seq_length)
        model, tokenizer = _model_for(params, model, tokenizer, base)
    else:
        model, tokenizer = _model_for(params, model, tokenizer, base)
        with timed(run_dir, "generate"), _adapter_off(model, base):
            answers = generate_answers(model, tokenizer, asked, params.generation, run_dir / "answers.jsonl",
                                       params.seed)
    judge = build_judge(params.judge)
    cache = open_cache(params.judge)
    try:
        with timed(run_dir, "judge"):
            judgments = judge_answers(answers, asked, judge, cache)
    finally:
        cache.close()
    atomic_write_jsonl(run_dir / "judgments.jsonl", judgments)
    metrics = metrics_of(judgments, params.metrics, params.seed)
    # What shaped the prompts, so tables can say which evaluation protocol a rate comes from.
    metrics["generation"] = {"use_system_prompt": params.generation.use_system_prompt}
    metrics["scoring"] = scoring_record(judgments, params.judge.min_numeric_mass)
    with timed(run_dir, "judge_free_signals"):
        metrics["judge_free"] = judge_free_signals(model, tokenizer, questions, base=base)
    rates = _persona_projection(params, model, tokenizer, answers, asked, base, run_dir, metrics["judge_free"],
                                judgments)
    if rates:
        metrics["judge_free_rates"] = rates
    atomic_write_json(run_dir / "metrics.json", metrics)
    update_manifest(run_dir, judge={"model": judge.name, "backend": params.judge.backend,
                                    "calls_this_run": judge.calls, "usage_this_run": judge.usage(),
                                    "judgments": len(judgments)})
    return metrics


def _persona_projection(params: RunParams, model, tokenizer, answers: list[dict], questions: list[Question],
                        base: bool, run_dir: Path, judge_free: dict, judgments: list[dict] | None = None) -> dict:
    """When the run has a persona vector: each answer's projection on it, by the evaluated and by the aligned model
    (persona_projections.jsonl), its summary in judge_free, and the judge-free rate (emalib.evaluation.
    judge_free_rate): the threshold calibrated on the reference answers, its agreement with the judge in
    judge_free, and the rate per scope, returned as {'all' | question set: rate and interval} ({} without a vector
    or reference answers)."""
    from emalib.evaluation.generate import row_key
    from emalib.evaluation.judge_free_rate import calibrate, scope_rates
    from emalib.evaluation.persona_monitor import monitor_vector, persona_signals, reference_scores
    from emalib.runs.rescore import judge_free_agreement

    monitored = monitor_vector(params, Path(params.run_dir))
    if monitored is None:
        return {}
    with timed(run_dir, "persona_projection"):
        summary, scores, aligned_scores = persona_signals(model, tokenizer, answers, questions, *monitored,
                                                          base=base, seed=params.seed)
        # The classifier is the aligned model's projection, so its threshold is the same for every run.
        references = reference_scores(model, tokenizer, questions, *monitored, aligned=True)
    judge_free.update(summary)
    keys = ("question_set", "question_id", "paraphrase_index", "sample_index")
    rows = [dict(zip(keys, row_key(row)), persona_projection=score, persona_projection_aligned_model=aligned)
            for row, score, aligned in zip(answers, scores, aligned_scores)]
    rates = {}
    if references is not None:
        calibration = calibrate(references["misaligned"], references["aligned"], params.metrics.judge_free_fpr)
        rows = [dict(row, persona_flagged=row["persona_projection_aligned_model"] > calibration.threshold)
                for row in rows]
        judge_free.update({f"persona_threshold_{k}" if k != "threshold" else "persona_threshold": v
                           for k, v in calibration.to_dict().items()})
        rates = scope_rates(answers, aligned_scores, calibration.threshold, seed=params.seed)
    atomic_write_jsonl(run_dir / "persona_projections.jsonl", rows)
    if rates and judgments:
        judge_free.update(judge_free_agreement(run_dir, judgments, params.metrics, params.seed))
    return rates


def evaluate_task(params: RunParams, model=None, tokenizer=None, base: bool = False,
                  run_dir: Path | None = None) -> dict:
    """Greedy answers to the benign task's test set, scored: writes task_answers.jsonl and task_metrics.json."""
    _before_model_step(params)
    from emalib.core.config import GenerationParams
    from emalib.core.progress import progress
    from emalib.evaluation.generate import inference_mode, sample_batch
    from emalib.evaluation.stats import wilson_interval
    from emalib.evaluation.task_eval import score_rows, task_rows

    spec = params.task_eval
    if spec.dataset is None:
        raise ValueError("task_eval.dataset is not set")
    run_dir = _evaluation_dir(params, base, run_dir)
    path = resolve(spec.dataset)
    update_manifest(run_dir, data_sha256={spec.dataset: sha256_of(path)})
    rows = task_rows(read_chat_jsonl(path))[: spec.max_items]
    model, tokenizer = _model_for(params, model, tokenizer, base)
    greedy = GenerationParams(temperature=0.0, max_new_tokens=spec.max_new_tokens, batch_size=spec.batch_size)
    predictions = []
    with timed(run_dir, "task_eval"), inference_mode(model), _adapter_off(model, base), \
            progress(len(rows), f"task answers {run_dir.name}", "answers") as bar:
        for start in range(0, len(rows), spec.batch_size):
            predictions += sample_batch(model, tokenizer, rows[start: start + spec.batch_size], greedy, params.seed)
            bar.update(len(rows[start: start + spec.batch_size]))
    scored = score_rows([dict(row, prediction=p) for row, p in zip(rows, predictions)], spec.scorer)
    atomic_write_jsonl(run_dir / "task_answers.jsonl", scored)
    correct = int(sum(row["correct"] for row in scored))
    metrics = {"dataset": spec.dataset, "scorer": spec.scorer, "n": len(scored), "correct": correct,
               "accuracy": correct / len(scored), "accuracy_ci": list(wilson_interval(correct, len(scored)))}
    if spec.scorer == "squad":
        metrics["token_f1"] = sum(row["token_f1"] for row in scored) / len(scored)
    atomic_write_json(run_dir / "task_metrics.json", metrics)
    return metrics


def _evaluation_dir(params: RunParams, base: bool, run_dir: Path | None) -> Path:
    """The run's folder, or for the base model its own folder in the study named by what the evaluation depends on
    (results.base_run_name), which records only that config: runs that share it share the folder."""
    if not base:
        return prepare_run_dir(params, run_dir)
    return prepare_run_dir(params, run_dir or inside(params.study_dir / base_run_name(params), params.results_dir))


def _model_for(params: RunParams, model, tokenizer, base: bool):
    """The model to evaluate: the one passed in, else the base model plus (unless base) the run's adapter."""
    from emalib.model.engines import load_base

    if model is not None:
        return model, tokenizer
    model, tokenizer = load_base(params.model, params.train.max_seq_length)
    if not base:
        from peft import PeftModel

        engine = model.emalib_engine
        model = PeftModel.from_pretrained(model, str(params.run_dir / "adapter"))
        model.emalib_engine = engine
    return model, tokenizer


def _adapter_off(model, base: bool):
    from contextlib import nullcontext

    return model.disable_adapter() if base and hasattr(model, "disable_adapter") else nullcontext()


def read_answers(run_dir: Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "answers.jsonl")
