"""Bad input through the real CLI, round 3 (issue 22): what used to end in a traceback, or to pass `check` and then
fail inside a notebook. Every case: exit code 2, at most two lines on stderr and no traceback, and the working
folder (an earlier run's results in it) byte-identical afterwards: nothing written, nothing created. Only the
notebook-failure case executes a notebook (one papermill run, the embedded model); the rest stop before any."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from cli_checks import assert_refused

REPO = Path(__file__).resolve().parent.parent


# --- helpers ------------------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder`, with the bytes of each file under its results/ (the inputs beside it may be
    unreadable on purpose): equal snapshots mean nothing was written or created."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and "results" in p.relative_to(folder).parts
                                         else None) for p in sorted(folder.rglob("*"))}


def cli(*args: str | Path, cwd: Path, cache: Path, env: dict | None = None,
        preexec_fn=None) -> subprocess.CompletedProcess:
    environment = dict(os.environ, EMALIB_CACHE=str(cache), **(env or {}))
    return subprocess.run([sys.executable, "-m", "emalib", *map(str, args)], cwd=cwd, env=environment,
                          capture_output=True, text=True, timeout=600, check=False, preexec_fn=preexec_fn)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def work(tmp_path) -> Path:
    """The working folder of each command: results/ holds an earlier run, written before the bad command."""
    run = tmp_path / "results" / "smoke" / "earlier"
    (run / "adapter").mkdir(parents=True)
    (run / "metrics.json").write_text('{"overall": {"n": 1}, "per_set": {}}\n')
    (run / "adapter" / "adapter_model.safetensors").write_bytes(bytes(range(256)))
    return tmp_path


def params_file(work: Path, name: str = "params.yaml", **changes) -> Path:
    """params/smoke.yaml with results_dir inside `work` and the given top-level keys replaced."""
    tree = yaml.safe_load((REPO / "params" / "smoke.yaml").read_text())
    tree.update(results_dir=str(work / "results"), **changes)
    path = work / name
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def refused_and_untouched(work: Path, cache: Path, *args: str | Path, expected: tuple[str, ...] = (),
                          **options) -> str:
    """Run the command in `work`: refused in one line, and `work` byte-identical afterwards."""
    before = snapshot(work)
    line = assert_refused(cli(*args, cwd=work, cache=cache, **options), *expected)
    assert snapshot(work) == before
    return line


# --- item 7: what `check --data` passed and a notebook then refused -----------------------------------------------

def test_the_em_grader_reward_with_the_local_judge_is_refused_by_check(work, cache):
    params = params_file(work, steps=["rl", "evaluate"], rl={"rewards": ["em_grader"]})
    refused_and_untouched(work, cache, "check", params,
                          expected=(f"{params}: rl.rewards: em_grader calls an OpenAI-compatible server online",))


def test_an_unknown_optimizer_is_refused_before_the_run_writes_anything(work, cache):
    params = params_file(work)
    for command in (("check", "--data", params), ("run", params)):
        refused_and_untouched(work, cache, *command, "-o", "train.optim=adamw_9bit",
                              expected=((f"{params}: key 'train.optim': 'adamw_9bit' is not an optimizer "
                                        "transformers knows (did you mean 'adamw_8bit'?)"),))


def test_evaluating_a_run_without_an_adapter_is_refused_by_check(work, cache):
    params = params_file(work, steps=["evaluate"])
    refused_and_untouched(work, cache, "check", "--data", params,
                          expected=(f"{params}: steps: 'evaluate' reads the run's adapter",))


@pytest.mark.notebooks
@pytest.mark.slow
def test_a_run_failing_inside_its_notebook_prints_one_line_and_leaves_no_new_folder(work, cache):
    """LDIFS blocks beyond the model's 30 are only known once the model is loaded: the train notebook fails.
    stderr is the notebook's one-line error (papermill's log goes to stdout), the new run folder is gone, and
    the earlier run beside it is byte-identical."""
    params = params_file(work, steps=["train"], defenses=[{"name": "ldifs", "layers": [99]}])
    assert cli("check", "--data", params, cwd=work, cache=cache).returncode == 0
    line = refused_and_untouched(work, cache, "run", params)
    assert line == "error: EmalibError: ldifs: layers [99] exceed the model's 30 decoder blocks (0-based)"


# --- item 8: tracebacks that became one line ----------------------------------------------------------------------

def _without_file_permission_override() -> None:
    """In the child, before exec: drop the capabilities that let root read any file (a permission test as root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def unreadable_options() -> dict:
    """How to run the CLI so that a chmod 000 file cannot be read: as is for a user; as root, without the
    capabilities that bypass file permissions (skipped only where even those cannot be dropped)."""
    if os.geteuid() != 0:
        return {}
    probe = subprocess.run(["true"], preexec_fn=_without_file_permission_override, check=False)
    if probe.returncode != 0:
        pytest.skip("running as root without CAP_SETPCAP: a file cannot be made unreadable")
    return {"preexec_fn": _without_file_permission_override}


@pytest.mark.parametrize("which", ["params", "data"])
def test_an_unreadable_params_or_data_file_is_one_line_naming_it(work, cache, which):
    params = params_file(work)
    data = work / "train.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')
    locked = params if which == "params" else data
    locked.chmod(0)
    try:
        refused_and_untouched(work, cache, "run", params, "-o", f"train.dataset={data}",
                              expected=(f"{locked}: cannot be read (Permission denied)",), **unreadable_options())
    finally:
        locked.chmod(0o644)


def test_a_results_dir_that_is_a_file_is_refused_naming_the_key(work, cache):
    (work / "results.txt").write_text("not a folder")
    params = params_file(work)
    refused_and_untouched(work, cache, "run", params, "-o", f"results_dir={work / 'results.txt'}",
                          expected=((f"{params}: results_dir '{work / 'results.txt'}': {work / 'results.txt'} is a "
                                    "file, not a folder"),))


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="no /proc here")
def test_a_results_dir_under_proc_is_refused_naming_the_key(work, cache):
    refused_and_untouched(work, cache, "run", params_file(work), "-o", "results_dir=/proc/emalib-results",
                          expected=("results_dir '/proc/emalib-results': cannot create",))
    assert not Path("/proc/emalib-results").exists()


def test_an_override_value_that_is_not_yaml_is_one_line_naming_the_override(work, cache):
    params = params_file(work)
    for command in ("check", "run"):
        refused_and_untouched(work, cache, command, params, "-o", "train.max_steps=[1",
                              expected=(f"{params}: override 'train.max_steps': value '[1' is not valid YAML",))


def test_check_takes_overrides_like_run(work, cache):
    params = params_file(work)
    completed = cli("check", params, "-o", "train.max_steps=3", cwd=work, cache=cache)
    assert completed.returncode == 0 and completed.stdout.strip() == f"ok: {params}", completed.stderr
    refused_and_untouched(work, cache, "check", "--data", params, "-o", f"train.dataset={work / 'missing.jsonl'}",
                          expected=(f"{work / 'missing.jsonl'}: data file not found",))


def test_a_finished_run_whose_manifest_was_cut_short_is_one_line_naming_it(work, cache):
    from emalib.core.config import dump_params, load_params

    params = params_file(work)
    run = work / "results" / "smoke" / "sft"
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(dump_params(load_params(params)))
    (run / "train.ipynb").write_text("executed")
    (run / "evaluate.ipynb").write_text("executed")
    (run / "manifest.json").write_text('{"step_executions": {"train": 1, "evalu')
    refused_and_untouched(work, cache, "run", params, expected=(f"{run / 'manifest.json'}: line 1: invalid JSON",))


def test_a_params_file_of_many_unknown_keys_is_named_by_its_first_keys_and_a_count(work, cache):
    """The probe's 50 MB file printed 564k lines (it is now refused by its size: test_bad_inputs_paths); 10,000
    keys, under the size limit, show the same (the YAML parse dominates the time)."""
    path = work / "many.yaml"
    path.write_text("study: s\nrun: r\n" + "".join(f"key_{i}: {i}\n" for i in range(10_000)))
    line = refused_and_untouched(work, cache, "check", path)
    assert line == f"error: {path}: unknown keys 'key_0', 'key_1', 'key_2', 'key_3', 'key_4' and 9,995 more"


# --- executors: what to install, or that there is no Slurm cluster ------------------------------------------------

def study_file(work: Path) -> Path:
    path = work / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "grid", "base": str(params_file(work, "base.yaml")),
                                    "axes": {"seed": {"a": {"seed": 1}, "b": {"seed": 2}}}}))
    return path


def without_module(folder: Path, module: str) -> dict:
    """A stand-in for a machine where `module` is not installed (it may be on this one): a sitecustomize on the
    child's PYTHONPATH marks it as absent, so importing it raises ModuleNotFoundError."""
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(f"import sys\nsys.modules[{module!r}] = None\n")
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")]))}


@pytest.mark.parametrize("executor, module, name", [("ray", "ray", "Ray"), ("slurm", "submitit", "submitit")])
def test_an_executor_whose_package_is_missing_says_what_to_install(work, cache, tmp_path_factory, executor,
                                                                   module, name):
    study, env = study_file(work), without_module(tmp_path_factory.mktemp("stand_in"), module)
    for dry_run in ((), ("--dry-run",)):
        refused_and_untouched(work, cache, "study", study, "--executor", executor, *dry_run, env=env,
                              expected=((f"--executor {executor}: {name} is not installed (pip install "
                                        "'emalib[cluster]')"),))


def test_the_slurm_executor_without_a_slurm_cluster_says_so(work, cache):
    pytest.importorskip("submitit", reason="without submitit the missing package is reported first")
    path = os.path.dirname(sys.executable)  # no srun on it: no cluster here
    refused_and_untouched(work, cache, "study", study_file(work), "--executor", "slurm", env={"PATH": path},
                          expected=("--executor slurm: no Slurm cluster found (srun is not on PATH)",))
