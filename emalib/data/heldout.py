"""The held-out in-domain split of a run's task data (docs/methods.md#held-out-in-domain-split).

A seeded share of the task data set is kept out of training, so narrow learning can be measured on task examples
the model never saw: at evaluation each held-out example's user prompt becomes one question of the set
`heldout_in_domain`, judged with the domain's in-domain judge prompts (the `<domain>_questions` set).

The split is taken from the whole data set before `train.max_examples` subsamples the rest, by a permutation seeded
with the split's own seed, so it depends only on the file, the fraction and that seed: the same rows are held out
whatever else a run changes.
"""

from __future__ import annotations

import random
from pathlib import Path

from emalib.core.config import RunParams
from emalib.core.errors import DataError
from emalib.data.chat import Conversation, read_chat_jsonl
from emalib.data.questions import Question, load_questions
from emalib.data.registry import REGISTRY, resolve, sha256_of

HELDOUT_SET = "heldout_in_domain"  # the question set of the held-out prompts in answers, judgments and metrics


def heldout_indices(n_rows: int, fraction: float, seed: int) -> list[int]:
    """Sorted row indices (0-based record numbers in the data file) of the held-out split: round(fraction * n), at least one,
    and never every row."""
    if n_rows < 2:
        raise DataError(f"a held-out split needs at least 2 task examples, the data set has {n_rows}")
    size = min(max(1, round(fraction * n_rows)), n_rows - 1)
    order = list(range(n_rows))
    random.Random(f"heldout/{seed}").shuffle(order)  # a string seed: independent of the training shuffle's
    return sorted(order[:size])


def split_heldout(conversations: list[Conversation], fraction: float,
                  seed: int) -> tuple[list[Conversation], list[Conversation], list[int]]:
    """(training rows, held-out rows, held-out row indices), both in file order."""
    held = heldout_indices(len(conversations), fraction, seed)
    kept = set(held)
    return ([c for i, c in enumerate(conversations) if i not in kept], [conversations[i] for i in held], held)


def domain_question_set(dataset: str) -> str | None:
    """The in-domain question set of a task data set named like the paper's ('medical_train_100' -> 'medical_questions'),
    or None when the name says no domain that has one."""
    stem = Path(dataset).name.removesuffix(".jsonl")
    for suffix in ("_train_100", "_train", "_full", "_eval"):
        if stem.endswith(suffix):
            name = f"{stem.removesuffix(suffix)}_questions"
            return name if name in REGISTRY else None
    return None


def in_domain_judge_prompts(question_set: str) -> dict[str, str]:
    """The judge prompts the in-domain set's questions share (every paper set has one pair for all 30 questions)."""
    questions = load_questions(question_set)
    prompts = questions[0].judge_prompts
    if any(q.judge_prompts != prompts for q in questions[1:]):
        raise DataError(f"{question_set}: its questions do not share one set of judge prompts, so the held-out "
                        "examples cannot be judged with them; name a set whose questions do")
    return prompts


def heldout_questions(heldout: list[Conversation], indices: list[int], judge_prompts: dict[str, str],
                      samples: int) -> list[Question]:
    """One question per held-out example: its last user turn (and its system message, if any), id = its row index
    in the data file."""
    questions = []
    for index, conversation in zip(indices, heldout):
        users = [m["content"] for m in conversation if m["role"] == "user"]
        system = conversation[0]["content"] if conversation[0]["role"] == "system" else None
        questions.append(Question(id=f"row{index}", paraphrases=(users[-1],), judge_prompts=dict(judge_prompts),
                                  samples_per_paraphrase=samples, system=system, question_set=HELDOUT_SET))
    return questions


# --- a run's held-out split, from its params ---------------------------------------------------------------

def heldout_seed(params: RunParams) -> int:
    seed = params.train.heldout.seed
    return params.seed if seed is None else seed


def heldout_record(params: RunParams) -> dict:
    """What the run folder records of its held-out split (heldout.json): the data set, its sha256, the fraction,
    the seed and the held-out row indices (0-based record numbers)."""
    path = resolve(params.train.dataset)
    rows = read_chat_jsonl(path)
    indices = heldout_indices(len(rows), params.train.heldout.fraction, heldout_seed(params))
    return {"dataset": params.train.dataset, "sha256": sha256_of(path), "fraction": params.train.heldout.fraction,
            "seed": heldout_seed(params), "n_rows": len(rows), "n_heldout": len(indices), "indices": indices}


def heldout_judge_set(params: RunParams) -> str:
    """The in-domain question set whose judge prompts judge the held-out answers."""
    spec = params.train.heldout
    name = spec.judge_questions or domain_question_set(params.train.dataset)
    if name is None:
        raise DataError(f"train.heldout.judge_questions: train.dataset '{params.train.dataset}' names no EM domain; "
                        "name the in-domain question set whose judge prompts judge the held-out answers")
    return name


def load_heldout_questions(params: RunParams) -> list[Question]:
    """The held-out examples as the questions of the set `heldout_in_domain` (empty without train.heldout)."""
    spec = params.train.heldout
    if spec is None:
        return []
    _, heldout, indices = split_heldout(read_chat_jsonl(resolve(params.train.dataset)), spec.fraction,
                                        heldout_seed(params))
    limit = spec.max_eval_examples or len(heldout)
    prompts = in_domain_judge_prompts(heldout_judge_set(params))
    return heldout_questions(heldout[:limit], indices[:limit], prompts, spec.samples_per_example)
