"""One row per evaluated run with its rates by question scope side by side (general, in-domain), its judge-free signals
and task accuracy: the unit every paper table and figure is made of. Rates stay fractions here; the tables show %."""

from __future__ import annotations

import pandas as pd

from emalib.reporting.frame import METHODS

KEY = ["model", "domain", "task", "method", "strength", "seed"]
RATES = ("misaligned_rate", "incoherent_rate")
SCOPES = ("general", "in_domain")
RUN_VALUES = ("loglik_gap", "loglik_gap_lo", "loglik_gap_hi", "kl_to_base", "kl_to_base_lo", "kl_to_base_hi",
           "task_accuracy", "task_accuracy_lo", "task_accuracy_hi")  # a run's values, the same in every scope


def run_cells(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns: KEY, node, `<scope>_<misaligned|incoherent>` with `_lo` / `_hi`, loglik_gap, kl_to_base and
    task_accuracy (each with _lo/_hi), judged (whether any rate was judged)."""
    out = []
    for node, rows in frame[frame["status"] == "done"].groupby("node", sort=False):
        first = rows.iloc[0]
        cell = {key: first[key] for key in KEY}
        cell.update(node=node, kind=first["kind"], run_dir=first["run_dir"],
                    judge=first["judge"])
        for scope in SCOPES:
            scoped = rows[rows["scope"] == scope]
            for rate in RATES:
                name = f"{scope}_{rate.removesuffix('_rate')}"
                if scoped.empty:
                    cell[name] = cell[f"{name}_lo"] = cell[f"{name}_hi"] = None
                    continue
                cell[name] = scoped.iloc[0][rate]
                cell[f"{name}_lo"] = scoped.iloc[0][f"{rate}_ci_lo"]
                cell[f"{name}_hi"] = scoped.iloc[0][f"{rate}_ci_hi"]
        for key in RUN_VALUES:
            cell[key] = first[key]
        cell["judged"] = bool(rows["misaligned_rate"].notna().any())
        out.append(cell)
    return pd.DataFrame(out, columns=[*KEY, "node", "kind", "run_dir", "judge",
                                      *[f"{s}_{r.removesuffix('_rate')}{x}" for s in SCOPES for r in RATES
                                        for x in ("", "_lo", "_hi")],
                                      *RUN_VALUES, "judged"])


def _same(a, b) -> bool:
    if a is None or pd.isna(a):
        return b is None or pd.isna(b)
    return b is not None and not pd.isna(b) and abs(float(a) - float(b)) < 1e-12


def select(cells: pd.DataFrame, **where) -> pd.DataFrame:
    """Rows matching every keyword (None matches a missing value; floats by value)."""
    mask = pd.Series(True, index=cells.index)
    for key, value in where.items():
        mask &= cells[key].map(lambda v, value=value: _same(v, value) if isinstance(value, float) or value is None
                               else v == value)
    return cells[mask]


def planned_or_run_pairs(sources: tuple[pd.DataFrame, ...], keep,
                         seed: list | None = None) -> list[tuple[str, float | None]]:
    """The distinct (method, strength) pairs of the rows `keep(frame)` selects in any of the frames (planned nodes,
    finished runs), after `seed`'s pairs, in the paper's method order and then by strength."""
    pairs: list[tuple[str, float | None]] = list(seed or [])
    for source in sources:
        if source is None or source.empty:
            continue
        for method, strength in source[keep(source)][["method", "strength"]].itertuples(index=False):
            strength = None if strength is None or pd.isna(strength) else float(strength)
            if not any(m == method and _same(s, strength) for m, s in pairs):
                pairs.append((method, strength))
    order = list(METHODS)
    return sorted(pairs, key=lambda r: (order.index(r[0]) if r[0] in order else len(order), r[1] or 0.0))


def expected_rows(cells: pd.DataFrame, planned: pd.DataFrame, model: str, domain: str,
                  paper_grid: bool) -> list[tuple[str, float | None]]:
    """The (method, strength) rows a table for this model and domain shows: the paper's methods at the paper's
    strengths (when the table follows the paper's grid), then every other method and strength the study planned or
    ran (a method published after the paper among them: never a row of gaps in a table of the paper's)."""
    grid = [(m, spec.paper_strength) for m, spec in METHODS.items() if spec.in_paper] if paper_grid else []
    return planned_or_run_pairs((planned, cells),
                            lambda f: (f["model"] == model) & (f["domain"] == domain) & f["task"].isna(), grid)
