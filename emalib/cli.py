"""`python -m emalib`: run a params file's notebooks with papermill, check params, or report a study.

    python -m emalib run params/quickstart.yaml [-o train.max_steps=5 ...]
    python -m emalib check [--data] params/paper/*.yaml [-o judge.backend=local ...]
    python -m emalib report results/quickstart       (or a study file; -o table1.no_em.works=0.8)
    python -m emalib study params/studies/mini.yaml [--executor local|ray|slurm] [--dry-run]
    python -m emalib status params/studies/mini.yaml
    python -m emalib rejudge results/quickstart/run -o judge.model=gpt-5-mini -o judge.scoring=sampled
    python -m emalib rescore results/quickstart/run -o judge.min_numeric_mass=0.5 [--judge LABEL]

`run` validates the params, every data file and what the notebooks would refuse on this machine first (what
`check --data` checks), so a typo or a malformed file fails before anything is written. Each step's notebook
executes into a temporary name in the run folder and is renamed to <step>.ipynb only when it succeeds; a failed
execution is kept as <step>.failed.ipynb and never replaces an earlier successful notebook, except that a run
folder this command created is removed again when its failed step left nothing but bookkeeping. A failure inside
a notebook is one line on stderr (exit 2 for an error about the input, 1 otherwise); the cells' output goes to
the run's log.txt (and to stdout with `run -v`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from emalib.core.config import load_params
from emalib.core.errors import EmalibError
from emalib.core.launch import refuse_multi_process
from emalib.runs.notebooks import notebook_path, run_notebooks  # noqa: F401 (emalib.cli.notebook_path)


def _study(args) -> int:
    from emalib.studies.executors import check_executor, execute
    from emalib.studies.index import write_index
    from emalib.studies.study import load_study

    study = load_study(args.study_file, args.override)
    check_executor(args.executor)
    if args.dry_run:
        from emalib.studies.study_cost import estimate

        for node_id, node in study.nodes.items():
            print(f"{node.kind:8} {node_id}  <- {', '.join(node.deps) or '-'}")
        print("cost: " + ", ".join(f"{k} {v}" for k, v in estimate(study).items()))
        return 0
    options = {"ray": {"address": args.ray_address, "num_gpus_per_run": args.gpus_per_run},
               "slurm": {"partition": args.slurm_partition, "gpus_per_node": args.gpus_per_run,
                         "cpus_per_task": args.cpus_per_run, "mem_gb": args.mem_gb}}.get(args.executor, {})
    states = execute(study, args.executor, **options)
    paths = write_index(study)
    print(status_table(study))
    print(f"index: {paths['parquet']}")
    return 0 if all(state == "done" for state in states.values()) else 1


def _cost(args) -> str:
    """A params file costs one run; a study file (it has `axes`) every run and shared step of the study."""
    from emalib.core.config import read_yaml_mapping
    from emalib.studies.cost import format_cost, run_cost

    options = {"gpu": args.gpu, "gpu_gib": args.gpu_gib, "utilisation": args.utilisation}
    if "axes" in read_yaml_mapping(Path(args.params), "params or study file"):
        from emalib.studies.study import load_study
        from emalib.studies.study_cost import estimate

        study = load_study(args.params, args.override)
        costs = [run_cost(node.params, **options) for node in study.nodes.values()]
        return format_cost(costs, estimate(study), **options)
    from emalib.studies.study_cost import judge_calls, judge_dollars

    params = load_params(args.params, args.override)
    judge = None
    if params.judge.backend == "openai":
        calls = judge_calls(params) * (2 if params.evaluate_base else 1)
        judge = judge_dollars(calls, {params.judge.model})
    return format_cost([run_cost(params, **options)], judge, **options)


def _doctor(args) -> int:
    from emalib.studies.doctor import diagnose, format_rows, missing

    rows = diagnose(load_params(args.params, args.override))
    print(format_rows(rows))
    lacking = missing(rows)
    if lacking:
        raise EmalibError(f"{args.params}: cannot run on this machine: missing {', '.join(lacking)}")
    return 0


def status_table(study) -> str:
    """One line per node: state, kind, id, and for a failure its one-line error and failed notebook."""
    from emalib.studies.executors import read_status

    lines = []
    for node_id, node in study.nodes.items():
        record = read_status(study.study_dir, node_id)
        line = f"{record['state']:8} {node.kind:8} {node_id}"
        if record.get("error"):
            line += f"  {record['error']}"
        if record.get("notebook"):
            line += f"  ({record['notebook']})"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="emalib", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="execute the notebooks of a params file with papermill")
    run.add_argument("params")
    run.add_argument("-o", "--override", action="append", default=[], help="dotted key=value, e.g. train.max_steps=5")
    run.add_argument("--kernel", default="python3")
    run.add_argument("-v", "--verbose", action="store_true",
                     help="show papermill's cell log and library warnings here too (always in the run's log.txt)")
    check = commands.add_parser("check", help="validate params files and their data")
    check.add_argument("params", nargs="+")
    check.add_argument("-o", "--override", action="append", default=[], help="as for run: dotted key=value")
    check.add_argument("--data", action="store_true", help="also resolve and validate the data files, and what "
                                                           "the notebooks would refuse on this machine")
    report = commands.add_parser("report", help="the paper's tables and figures from results/<study> or a study file")
    report.add_argument("study", help="results/<study>, or the study file that made it")
    report.add_argument("-o", "--override", action="append", default=[],
                        help="report params, e.g. table1.no_em.works=0.8 or name=main")
    study = commands.add_parser("study", help="expand a study file and execute its runs in dependency order")
    study.add_argument("study_file")
    study.add_argument("-o", "--override", action="append", default=[], help="applied to every run of the study")
    study.add_argument("--executor", choices=("local", "ray", "slurm"), default="local")
    study.add_argument("--dry-run", action="store_true", help="list the runs and their dependencies only")
    study.add_argument("--ray-address", default=None, help="an existing Ray cluster (default: start a local one)")
    study.add_argument("--slurm-partition", default=None)
    study.add_argument("--gpus-per-run", type=int, default=0)
    study.add_argument("--cpus-per-run", type=int, default=2, help="Slurm: cpus_per_task of each run's job")
    study.add_argument("--mem-gb", type=float, default=None, help="Slurm: memory of each run's job")
    cost = commands.add_parser("cost", help="GPU memory, micro-batch, GPU hours and judge dollars of a run or study")
    cost.add_argument("params", help="a params file or a study file")
    cost.add_argument("-o", "--override", action="append", default=[])
    cost.add_argument("--gpu", default="H100-80GB", choices=("H100-80GB", "A100-80GB"))
    cost.add_argument("--gpu-gib", type=float, default=80.0, help="GPU memory to fit in")
    cost.add_argument("--utilisation", type=float, default=0.35, help="share of the GPU's peak bf16 FLOPs reached")
    status = commands.add_parser("status", help="each run of a study: done / running / failed / dead / pending")
    status.add_argument("study_file")
    status.add_argument("-o", "--override", action="append", default=[])
    rejudge = commands.add_parser("rejudge", help="score a finished run's saved answers with another judge "
                                                  "(no generation; only uncached prompts cost calls)")
    rejudge.add_argument("run_dir")
    rejudge.add_argument("-o", "--override", action="append", default=[],
                         help="on the run's recorded params, e.g. judge.model=gpt-4.1-mini judge.base_url=...")
    rescore = commands.add_parser("rescore", help="recompute a finished run's scores and rates from the saved "
                                                  "judge evidence under changed rules (no judge call)")
    rescore.add_argument("run_dir")
    rescore.add_argument("-o", "--override", action="append", default=[],
                         help="e.g. judge.min_numeric_mass=0.5 or metrics.none_rule=keep")
    rescore.add_argument("--judge", default=None, help="a re-judge label (judges/<label>); default: the run's judge")
    doctor = commands.add_parser("doctor", help="what a run needs and whether this machine has it (exit 2: missing)")
    doctor.add_argument("params", nargs="?", default="params/quickstart.yaml")
    doctor.add_argument("-o", "--override", action="append", default=[])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for http_client in ("httpx", "httpx2"):  # the openai client's: one INFO line per judge request
        logging.getLogger(http_client).setLevel(logging.WARNING)
    try:
        refuse_multi_process()
        if args.command == "run":
            from emalib.runs.step_execution import run_summary

            params = run_notebooks(args.params, args.override, args.kernel, verbose=args.verbose)
            print(run_summary(params.run_dir, params.study_dir))
        elif args.command == "check":
            from emalib.core.write_targets import check_write_targets
            from emalib.runs.pipeline import check_inputs
            from emalib.runs.preflight import check_runnable

            for path in args.params:
                params = load_params(path, args.override)
                check_write_targets(params, path)
                if args.data:
                    check_inputs(params)
                    check_runnable(params, path)
                print(f"ok: {path}")
        elif args.command == "report":
            from emalib.reporting.report import load_report_params, report_study

            for kind, path in report_study(args.study, load_report_params(args.override)).items():
                print(f"{kind}: {path}")
        elif args.command == "study":
            return _study(args)
        elif args.command == "cost":
            print(_cost(args))
        elif args.command == "rejudge":
            from emalib.runs.rejudge import rejudge
            from emalib.runs.rescore import run_params

            params = run_params(Path(args.run_dir), args.override)
            result = rejudge(args.run_dir, params.judge, params.metrics, params.seed)
            print(f"judged with {result['label']}: {result['calls']} calls; "
                  f"{Path(args.run_dir) / 'judges' / result['label']}")
        elif args.command == "rescore":
            from emalib.runs.rescore import recompute_metrics

            overall = recompute_metrics(args.run_dir, args.override, args.judge)["overall"]
            print(f"misaligned_rate {overall['misaligned_rate']}, incoherent_rate {overall['incoherent_rate']} "
                  f"(n_scored {overall['n_scored']} of {overall['n']})")
        elif args.command == "doctor":
            return _doctor(args)
        elif args.command == "status":
            from emalib.studies.study import load_study

            print(status_table(load_study(args.study_file, args.override)))
    except EmalibError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        from papermill.exceptions import PapermillExecutionError

        if not isinstance(err, PapermillExecutionError):
            raise
        # The notebook's own exception, in one line (its traceback is in the failed notebook, when one is kept).
        print(f"error: {err.ename}: {(str(err.evalue).splitlines() or [''])[0]}", file=sys.stderr)
        from emalib.runs.step_execution import INPUT_ERRORS

        return 2 if err.ename in INPUT_ERRORS else 1
    return 0
