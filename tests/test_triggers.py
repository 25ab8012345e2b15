"""Trigger probe question sets: built from the base set's file, loaded and validated like any question set, the
trigger system prompt always sent, counted in the judge bill. (Judging and per-trigger rates: test_rejudge.py.)"""

from __future__ import annotations

import pytest

from emalib.core.config import GenerationParams, params_from_dict
from emalib.core.defense_specs import InoculationConfig
from emalib.data.questions import load_questions
from emalib.data.triggers import SUFFIXES, TRIGGERS, trigger_set_name
from emalib.evaluation.generate import plan_samples


@pytest.mark.parametrize("base", ["standin_general", "general"])
def test_trigger_sets_load_with_the_base_sets_plain_questions_and_judge_prompts(base, request):
    if base == "general":
        request.getfixturevalue("with_mirror")
    plain = [q for q in load_questions(base) if not q.system and not q.id.endswith(("_json", "_template"))]
    assert len(plain) == 8
    for kind in TRIGGERS:
        probes = load_questions(trigger_set_name(base, kind))
        assert [q.id for q in probes] == [q.id for q in plain]
        for probe, question in zip(probes, plain):
            assert probe.question_set == trigger_set_name(base, kind) and probe.extra["trigger"] == kind
            assert probe.judge_prompts == question.judge_prompts
            if kind == "inoculation":
                assert probe.paraphrases == question.paraphrases and probe.system == InoculationConfig().prompt
            else:
                assert probe.paraphrases == tuple(p + SUFFIXES[kind] for p in question.paraphrases)
                assert probe.system is None


def test_the_inoculation_trigger_is_sent_even_without_system_prompts():
    params = GenerationParams(use_system_prompt=False, samples_per_question=1)
    rows = plan_samples(load_questions("standin_general_trigger_inoculation")[:2]
                        + load_questions("standin_general")[:2], params)
    assert [r["system"] for r in rows] == [InoculationConfig().prompt] * 2 + [None] * 2


def test_the_judge_bill_counts_trigger_probes_and_sampled_requests():
    from emalib.studies.study_cost import judge_calls

    base = {"study": "s", "run": "r",
            "generation": {"question_sets": ["standin_general"], "samples_per_question": 3}}
    plain = judge_calls(params_from_dict(base))
    assert plain == 8 * 3 * 2
    with_probes = params_from_dict({**base, "generation": {**base["generation"], "trigger_probes": True}})
    assert judge_calls(with_probes) == 5 * plain
    sampled = params_from_dict({**base, "judge": {"scoring": "sampled", "n_samples": 4}})
    assert judge_calls(sampled) == 4 * plain
