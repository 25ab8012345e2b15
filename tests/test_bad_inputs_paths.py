"""Bad input, round 3, through the real CLI: a path in the params that a run would write outside results_dir and the
cache (emalib/core/write_targets.py: checked where a run starts, never when a finished run's recorded params are
read), and a params file too large to parse in reasonable time (emalib/core/safe_yaml.py, MAX_CONFIG_BYTES). Each is
refused before anything is written: exit 2, one line naming the file and the key (or the size limit), the project
folder around the results byte-identical."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from cli_checks import assert_refused, project_folder
from test_bad_inputs_names import cli, smoke_tree, snapshot, write_params

from emalib.core.config import load_params
from emalib.core.errors import ParamsError
from emalib.core.safe_yaml import MAX_CONFIG_BYTES
from emalib.core.write_targets import check_write_targets


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture
def project(tmp_path) -> Path:
    return project_folder(tmp_path)


# Each key a run writes to, set to a path in the project folder beside results/ (where nothing may be written).
WRITE_TARGETS = {
    "judge.cache_path": {"judge": {"backend": "local", "model": "smollm2-135m-instruct",
                                   "cache_path": "{outside}/judge.sqlite"}},
    "defenses.persona_steering.vector_path": {
        "steps": ["persona_vector", "train"],
        "defenses": [{"name": "persona_steering", "layer": 10, "vector_path": "{outside}/evil.pt"}]},
    "defenses.safelora.matrices": {
        "steps": ["safelora_matrices", "train"],
        "defenses": [{"name": "safelora", "aligned": "smollm2-135m-instruct", "base": "smollm2-135m-instruct",
                      "matrices": "{outside}/safelora"}]},
    "defenses.interleave_plusplus.scores_path": {
        "steps": ["interleave_selection", "train"],
        "defenses": [{"name": "interleave_plusplus", "adapters": {"em": "{outside}/adapter"}, "use_all_adapters": True,
                      "scores_path": "{outside}/scores.jsonl"}]},
}


def with_folder(tree, outside: Path):
    """`tree` with '{outside}' replaced by `outside` in every string."""
    if isinstance(tree, str):
        return tree.replace("{outside}", str(outside))
    if isinstance(tree, dict):
        return {key: with_folder(value, outside) for key, value in tree.items()}
    if isinstance(tree, list):
        return [with_folder(value, outside) for value in tree]
    return tree


@pytest.mark.subprocess
@pytest.mark.parametrize("key", sorted(WRITE_TARGETS))
@pytest.mark.parametrize("command", ["run", "check"])
def test_a_path_the_run_would_write_outside_results_dir_is_refused_naming_the_key(project, cache, key, command):
    outside = project / "notebooks"  # beside results/: the project's own files
    path = write_params(project, yaml.safe_dump(smoke_tree(project, **with_folder(WRITE_TARGETS[key], outside)),
                                                sort_keys=False))
    before = snapshot(project.parent)
    line = assert_refused(cli(command, path, cwd=project, cache=cache), f"{path}: {key}: ",
                          f"outside results_dir ({(project / 'results').resolve()})", max_lines=1)
    assert "a path a run writes must lie in one of them" in line
    assert snapshot(project.parent) == before  # nothing written, in results/ or beside it


@pytest.mark.subprocess
def test_a_relative_path_that_climbs_out_of_results_dir_is_refused(project, cache):
    """'results/../x' names results/ but resolves beside it; the line shows where it resolves."""
    tree = smoke_tree(project, steps=["persona_vector", "train"],
                      defenses=[{"name": "persona_steering", "layer": 10, "vector_path": "results/../evil.pt"}])
    tree["results_dir"] = "results"
    path = write_params(project, yaml.safe_dump(tree, sort_keys=False))
    before = snapshot(project.parent)
    assert_refused(cli("run", path, cwd=project, cache=cache),
                   f"vector_path: results/../evil.pt resolves to {(project / 'evil.pt').resolve()}, outside")
    assert snapshot(project.parent) == before


def test_write_targets_inside_results_dir_or_the_cache_and_inputs_anywhere_are_accepted(project, monkeypatch):
    """The same keys inside results_dir, or inside EMALIB_CACHE, validate; an artifact outside both is still read
    when the step that would write it is not listed (a released persona vector used as it is)."""
    cache_root = project.parent / "cache"
    monkeypatch.setenv("EMALIB_CACHE", str(cache_root))
    path = project.parent / "p.yaml"
    for changes in WRITE_TARGETS.values():
        for root in (project / "results" / "shared", cache_root / "shared"):
            path.write_text(yaml.safe_dump(smoke_tree(project, **with_folder(changes, root))))
            check_write_targets(load_params(path), str(path))  # no ParamsError
    read_only = smoke_tree(project, steps=["train"], defenses=[
        {"name": "persona_steering", "layer": 10, "vector_path": str(project / "notebooks" / "released.pt")}])
    path.write_text(yaml.safe_dump(read_only))
    check_write_targets(load_params(path), str(path))
    with pytest.raises(ParamsError, match="defenses.persona_steering.vector_path: .* outside results_dir"):
        check_write_targets(load_params(path, ["steps=[persona_vector, train]"]), str(path))  # now a write target


def test_a_write_target_reached_through_a_link_out_of_results_dir_is_refused(project):
    """A link inside results_dir pointing out of it: the resolved path counts, not the written one."""
    (project / "results" / "elsewhere").symlink_to(project / "notebooks")
    tree = smoke_tree(project, judge={"backend": "local", "model": "smollm2-135m-instruct",
                                      "cache_path": str(project / "results" / "elsewhere" / "judge.sqlite")})
    path = write_params(project, yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match=r"judge.cache_path: .* resolves to .*notebooks/judge.sqlite, outside"):
        check_write_targets(load_params(path), str(path))


def many_unknown_keys(path: Path, megabytes: int) -> Path:
    line = "an_unknown_key_that_is_long_enough_to_fill_the_file_quickly_{:08d}: 1\n"
    count = megabytes * 2**20 // len(line.format(0))
    path.write_text("study: s\nrun: r\n" + "".join(line.format(i) for i in range(count)))
    return path


@pytest.mark.subprocess
def test_a_50_mb_params_file_is_refused_at_once_naming_the_limit(project, cache):
    """The probe's 50 MB file of unknown keys took minutes to parse; now its size refuses it before parsing."""
    path = many_unknown_keys(project.parent / "huge.yaml", 50)
    size = path.stat().st_size
    assert size > 50 * 10**6
    start = time.perf_counter()
    with pytest.raises(ParamsError) as raised:
        load_params(path)
    assert time.perf_counter() - start < 0.5
    expected = f"{path}: {size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit of a params file (refused before"
    assert str(raised.value).startswith(expected)
    before = snapshot(project)
    for command in ("check", "run"):
        assert_refused(cli(command, path, cwd=project, cache=cache), expected, max_lines=1)
    assert snapshot(project) == before


def test_a_params_file_just_under_the_limit_is_read_and_its_unknown_keys_named(project):
    """The limit refuses size, not content: a file under it is parsed and validated as before."""
    path = project.parent / "big.yaml"
    path.write_text("study: s\nrun: r\n" + "".join(f"key_{i:06d}: {i}\n" for i in range(MAX_CONFIG_BYTES // 20)))
    assert path.stat().st_size <= MAX_CONFIG_BYTES
    with pytest.raises(ParamsError, match=r"unknown keys 'key_000000', .* and [\d,]+ more$"):
        load_params(path)


@pytest.mark.subprocess
def test_a_study_file_over_the_limit_is_refused_naming_it(project, cache):
    path = project.parent / "study.yaml"
    path.write_text("study: grid\nbase: params.yaml\naxes: {}\n# padding\n" + "#" * (MAX_CONFIG_BYTES + 1) + "\n")
    assert_refused(cli("study", path, "--dry-run", cwd=project, cache=cache),
                   f"{path}: {path.stat().st_size:,} bytes, over the {MAX_CONFIG_BYTES:,}-byte limit of a")


def test_a_write_target_that_is_results_dir_itself_is_refused(project):
    """A step writes beside its target too (`<matrices>.tmp`), so the target must lie strictly below the root."""
    tree = smoke_tree(project, **with_folder(WRITE_TARGETS["defenses.safelora.matrices"], project))
    tree["defenses"][0]["matrices"] = str(project / "results")
    path = write_params(project, yaml.safe_dump(tree))
    with pytest.raises(ParamsError, match=r"defenses.safelora.matrices: .*/results resolves to .*, outside"):
        check_write_targets(load_params(path), str(path))


@pytest.mark.subprocess
def test_a_study_cell_that_would_write_outside_is_refused_before_anything_runs(project, cache):
    base = smoke_tree(project, study="x", run="x", evaluate_base=False)
    axes = {"defense": {"none": {}, "persona": with_folder(WRITE_TARGETS["defenses.persona_steering.vector_path"],
                                                            project / "notebooks")}}
    path = project.parent / "study.yaml"
    path.write_text(yaml.safe_dump({"study": "grid", "base": base, "axes": axes}))
    before = snapshot(project.parent)
    assert_refused(cli("study", path, cwd=project, cache=cache), f"{path}: cell persona: "
                   "defenses.persona_steering.vector_path: ", "outside results_dir")
    assert snapshot(project.parent) == before


@pytest.mark.subprocess
def test_rejudge_into_a_cache_outside_the_runs_results_dir_is_refused_before_any_call(project, cache):
    from test_bad_inputs_judge import make_run

    run_dir = make_run(project.parent, cache, "http://127.0.0.1:9/v1", samples=1)  # no server: no call is made
    outside = project / "notebooks" / "judge.sqlite"
    before = snapshot(project.parent)
    assert_refused(cli("rejudge", run_dir, "-o", f"judge.cache_path={outside}", cwd=project, cache=cache),
                   f"{run_dir / 'params.yaml'}: judge.cache_path: {outside} resolves to", "outside results_dir")
    assert snapshot(project.parent) == before


def test_a_finished_runs_recorded_params_are_read_wherever_its_cache_was(project, monkeypatch):
    """A base evaluation's params.yaml records no results_dir, and EMALIB_CACHE may differ from the run's: reading
    the recorded params (rescore, the report, explore) checks no write target."""
    from emalib.runs.rescore import run_params

    run_dir = project / "results" / "smoke" / "base-x"
    run_dir.mkdir(parents=True)
    elsewhere = project.parent / "old-cache" / "judge.sqlite"
    (run_dir / "params.yaml").write_text(yaml.safe_dump({"judge": {"cache_path": str(elsewhere)}}))
    monkeypatch.setenv("EMALIB_CACHE", str(project.parent / "new-cache"))
    monkeypatch.chdir(project.parent)
    assert run_params(run_dir).judge.cache_path == str(elsewhere)
