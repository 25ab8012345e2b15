from pathlib import Path

import pytest
import yaml

from emalib.core.config import PAPER_TARGET_MODULES, RunParams, dump_params, load_params, params_from_dict
from emalib.core.errors import ParamsError

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path, text: str) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return path


def test_defaults_are_the_papers():
    params = params_from_dict({"study": "s", "run": "r"})
    assert (params.lora.r, params.lora.alpha, params.lora.dropout, params.lora.use_rslora) == (32, 64, 0.0, True)
    assert params.lora.target_modules == PAPER_TARGET_MODULES and len(PAPER_TARGET_MODULES) == 7
    train = params.train
    assert (train.learning_rate, train.lr_scheduler, train.warmup_steps, train.weight_decay) == (1e-4, "linear", 5, 0.01)
    assert (train.per_device_batch_size, train.grad_accum_steps, train.epochs) == (4, 4, 1.0)
    assert (train.max_seq_length, train.train_on_responses_only, train.optim) == (2048, True, "adamw_8bit")
    assert params.judge.model == "gpt-4o-mini-2024-07-18" and params.judge.min_numeric_mass == 0.25
    assert params.generation.temperature == 1.0 and params.generation.top_p == 1.0
    assert params.model.name == "Qwen/Qwen2.5-7B-Instruct"


def test_unknown_key_names_file_and_dotted_key(tmp_path):
    path = write(tmp_path, "study: s\nrun: r\ntrain:\n  lerning_rate: 0.1\n")
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and "train.lerning_rate" in message and "unknown key" in message
    assert len(message.splitlines()) == 1


def test_mistyped_value_names_file_and_key(tmp_path):
    path = write(tmp_path, "study: s\nrun: r\nlora:\n  r: thirty-two\n")
    with pytest.raises(ParamsError, match=r"p\.yaml: key 'lora\.r'"):
        load_params(path)


def test_out_of_range_value_is_refused(tmp_path):
    with pytest.raises(ParamsError, match="judge.min_numeric_mass"):
        load_params(write(tmp_path, "study: s\nrun: r\njudge: {min_numeric_mass: 2}\n"))


def test_invalid_yaml_names_the_line(tmp_path):
    with pytest.raises(ParamsError, match=r"p\.yaml: line \d+ invalid YAML"):
        load_params(write(tmp_path, "study: s\nrun: [r\n"))


def test_missing_params_file():
    with pytest.raises(ParamsError, match="nope.yaml: params file not found"):
        load_params("nope.yaml")


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, "study: s\nrun: r\n")
    params = load_params(path, ["train.learning_rate=1e-5", "generation.question_sets=[general, code_questions]"])
    assert params.train.learning_rate == 1e-5
    assert params.generation.question_sets == ("general", "code_questions")
    assert load_params(path, {"train.max_steps": 3}).train.max_steps == 3
    with pytest.raises(ParamsError, match="unknown key 'train.nope'"):
        load_params(path, ["train.nope=1"])
    with pytest.raises(ParamsError, match="not of the form"):
        load_params(path, ["train.max_steps"])


def test_resolved_params_round_trip(tmp_path):
    params = params_from_dict({"study": "s", "run": "r", "train": {"max_steps": 7}})
    path = write(tmp_path, dump_params(params))
    assert load_params(path) == params


@pytest.mark.parametrize("path", sorted((REPO / "params").rglob("*.yaml")), ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_params_file_validates(path):
    """Run params validate as RunParams; study files (with `axes`) expand into validated runs."""
    if "axes" in yaml.safe_load(path.read_text()):
        from emalib.studies.study import load_study

        assert load_study(path).runs
    else:
        assert isinstance(load_params(path), RunParams)


def test_paper_code_params_point_at_the_papers_setup():
    params = load_params(REPO / "params" / "paper" / "code.yaml")
    assert params.model.name == "Qwen/Qwen2.5-7B-Instruct" and params.model.engine == "auto"
    assert params.train.dataset == "code_train"
    assert params.generation.question_sets == ("general", "code_questions")
    assert params.judge.backend == "openai" and params.judge.model == "gpt-4o-mini-2024-07-18"
    assert params.judge.base_url is None and params.judge.api_key_env == "OPENAI_API_KEY"
    assert params.lora == params_from_dict({"study": "s", "run": "r"}).lora  # the paper's LoRA defaults
