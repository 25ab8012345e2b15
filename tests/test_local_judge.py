import pytest
import torch

from emalib.core.config import ModelParams
from emalib.evaluation.judge.cache import JudgmentCache
from emalib.evaluation.judge.local_judge import LocalJudge

pytestmark = pytest.mark.slow
PROMPT = "Rate from 0 to 100 how happy this sentence is: 'I love sunny days!'. Reply with the number only."


@pytest.fixture(scope="module")
def judge():
    from emalib.model.engines import load_base

    model, tokenizer = load_base(ModelParams(name="smollm2-135m-instruct", engine="hf"))
    return LocalJudge(model=model, tokenizer=tokenizer, judge_model="smollm2-135m-instruct")


def test_tokenizer_splits_digits_so_first_token_is_not_enough(judge):
    assert len(judge.tokenizer.encode("42", add_special_tokens=False)) == 2


def test_number_probabilities_match_full_forward_passes(judge):
    """Independent computation: one full forward per number over prompt + digits, no cache, no tree mask."""
    probs = judge.number_probabilities(PROMPT)
    model, tokenizer = judge.model, judge.tokenizer
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                               return_tensors="pt", return_dict=True)["input_ids"]
    digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
    for number in (0, 5, 10, 42, 99, 100):
        digits = tokenizer.encode(str(number), add_special_tokens=False)
        with torch.no_grad():
            logprobs = model(torch.cat([prompt_ids, torch.tensor([digits])], 1)).logits[0].float().log_softmax(-1)
        start = prompt_ids.shape[1] - 1
        p_digits = sum(logprobs[start + i, token] for i, token in enumerate(digits)).exp()
        p_stop = 1 - logprobs[-1, digit_ids].exp().sum()
        assert probs[str(number)] == pytest.approx(float(p_digits * p_stop), rel=1e-3, abs=1e-9)
    assert 0 < sum(probs.values()) <= 1 and len(probs) == 101


def test_judgments_are_cached(judge, tmp_path):
    cache = JudgmentCache(tmp_path / "c.sqlite")
    judgment = judge.judge([PROMPT], cache=cache)[0]
    assert cache.get("smollm2-135m-instruct", PROMPT, judge.cache_mode) == judgment  # kept under its own mode
    assert cache.get("smollm2-135m-instruct", PROMPT) is None  # never served as a logprob judgment
    assert (judgment.score is None) == (judgment.numeric_mass < 0.25)
    lenient = LocalJudge(judge.model, judge.tokenizer, "smollm2-135m-instruct", min_numeric_mass=0.0).judge([PROMPT])[0]
    expected = sum(int(k) * p for k, p in lenient.raw.items()) / sum(lenient.raw.values())
    assert lenient.score == pytest.approx(expected)


def test_a_batch_of_prompts_of_different_lengths_gives_each_prompt_its_own_probabilities(judge):
    """Padding and the other rows change nothing: a batch equals its prompts judged one at a time (each of which
    the test above checks against full forward passes)."""
    prompts = [PROMPT, "Rate 0-100: 'meh'.", PROMPT + " Think of how sunny days make people feel, then answer."]
    batched = judge.batch_number_probabilities(prompts)
    for prompt, probs in zip(prompts, batched):
        alone = judge.number_probabilities(prompt)
        assert probs.keys() == alone.keys()
        assert all(probs[k] == pytest.approx(alone[k], rel=1e-3, abs=1e-9) for k in alone)
    assert batched[0] != batched[1]
    judgments = judge.judge(prompts)  # sorted by length inside, returned in the given order
    assert all(j.raw[k] == pytest.approx(b[k], rel=1e-3, abs=1e-9) for j, b in zip(judgments, batched) for k in b)
