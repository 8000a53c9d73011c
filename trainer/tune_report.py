"""What `trainer tune` shows and writes: the progress over trials, the trials table (terminal,
markdown, JSON), the best trial as a recipe file, and Optuna's matplotlib plots as PNG."""

from __future__ import annotations

import contextlib
import json
import math
import warnings
from pathlib import Path

from rich.table import Table

from trainer.recipe_file import write_recipe_file

PLOTS = ("optimization_history", "intermediate_values", "param_importances", "slice", "parallel_coordinate")


def trial_rows(study) -> list[dict]:
    """One dict per trial, in trial order: number, state, val accuracy, epochs run, seconds, params."""
    rows = []
    for trial in study.get_trials(deepcopy=False):
        attrs = trial.user_attrs
        state = trial.state.name
        if attrs.get("interrupted"):
            state = "FAIL (interrupted)"
        elif attrs.get("surplus"):
            state = "FAIL (surplus)"
        rows.append({"number": trial.number, "state": state, "val_accuracy": trial.value,
                     "epochs_run": attrs.get("epochs_run", 0), "seconds": attrs.get("seconds"),
                     "worker": attrs.get("worker"), "params": dict(trial.params)})  # fmt: skip
    return rows


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 0.01 or abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def _cells(row: dict, names: list[str]) -> list[str]:
    val = row["val_accuracy"]
    cells = [str(row["number"]), row["state"], "-" if val is None or math.isnan(val) else f"{val:.2%}",
             str(row["epochs_run"]), "-" if row["seconds"] is None else f"{row['seconds']:.0f} s"]  # fmt: skip
    return cells + [_format(row["params"][n]) if n in row["params"] else "" for n in names]


_HEAD = ["trial", "state", "val acc", "epochs", "time"]


def _param_names(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(name for row in rows for name in row["params"]))


def print_table(console, rows: list[dict], title: str) -> None:
    names = _param_names(rows)
    table = Table(title=title)
    for column in _HEAD + names:
        table.add_column(column, justify="left" if column == "state" else "right", no_wrap=True)
    best = _best_number(rows)
    for row in rows:
        table.add_row(*_cells(row, names), style="bold green" if row["number"] == best else None)
    console.print(table)


def _best_number(rows: list[dict]):
    complete = [r for r in rows if r["state"] == "COMPLETE"]
    return max(complete, key=lambda r: r["val_accuracy"])["number"] if complete else None


def write_tables(out_dir: Path, rows: list[dict], title: str) -> None:
    """trials.md (the table, best trial in bold) and trials.json (every row)."""
    names = _param_names(rows)
    best = _best_number(rows)
    lines = [f"**{title}**", "", "| " + " | ".join(_HEAD + names) + " |", "|" + " --- |" * (len(_HEAD) + len(names))]
    for row in rows:
        cells = _cells(row, names)
        if row["number"] == best:
            cells = [f"**{c}**" if c else c for c in cells]
        lines.append("| " + " | ".join(cells) + " |")
    (out_dir / "trials.md").write_text("\n".join(lines) + "\n")
    (out_dir / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")


def write_best_recipe(path: Path, study, recipe: str, hyper_for_params, full_epochs: int, settings: dict) -> dict | None:
    """best_recipe.json for `trainer train --recipe-file`: the best trial's parameters, the full epoch count."""
    try:
        best = study.best_trial
    except ValueError:  # no complete trial yet
        return None
    hyper = hyper_for_params(best.params)
    hyper["epochs"] = full_epochs  # trials may be short; the recipe trains for the recipe's own count
    tuned = {"study": study.study_name, "trial": best.number, "val_accuracy": best.value,
             "trial_epochs": settings["epochs_per_trial"], "params": best.params,
             "val_fraction": settings["val_fraction"], "split_seed": settings["split_seed"], "seed": settings["seed"]}  # fmt: skip
    write_recipe_file(path, recipe, hyper, tuned)
    return tuned


def save_plots(study, out_dir: Path) -> dict[str, str]:
    """{plot: path, or why it was skipped}. Importances and slices need a few complete trials."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna.visualization.matplotlib as ovm

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in PLOTS:
        path = out_dir / f"{name}.png"
        try:
            with warnings.catch_warnings():  # Optuna calls its matplotlib backend "experimental"
                warnings.simplefilter("ignore")
                axes = getattr(ovm, f"plot_{name}")(study)
                figure = (axes.flat[0] if hasattr(axes, "flat") else axes).figure
                figure.set_size_inches(max(figure.get_size_inches()[0], 8), max(figure.get_size_inches()[1], 5))
                figure.tight_layout()
            figure.savefig(path, dpi=100)
            plt.close(figure)
            written[name] = str(path)
        except Exception as error:  # too few trials for this plot, most often
            written[name] = f"skipped: {error}"
            plt.close("all")
    return written


class TrialProgress:
    """A rich bar over trials (on a terminal) and one plain line per trial (always, for log files)."""

    def __init__(self, console, total: int | None, study_name: str):
        self.console, self.total, self.study_name = console, total, study_name
        self.progress, self.task = None, None

    @contextlib.contextmanager
    def running(self):
        if not self.console.is_terminal:
            yield self
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = [TextColumn(f"{self.study_name}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[status]}"), TimeElapsedColumn()]  # fmt: skip
        with Progress(*columns, console=self.console) as progress:
            self.progress = progress
            self.task = progress.add_task("trials", total=self.total, status="")
            yield self

    def epoch(self, trial, row: dict, epochs: int) -> None:
        if self.progress is not None:
            status = f"trial {trial.number}: epoch {row['epoch']}/{epochs}, val {row['val_accuracy']:.2%}"
            self.progress.update(self.task, status=status)

    def trial_done(self, row: dict, best: float | None) -> None:
        val = row["val_accuracy"]
        params = ", ".join(f"{k}={_format(v)}" for k, v in row["params"].items())
        best_text = "" if best is None else f" (best {best:.2%})"
        self.console.print(f"trial {row['number']:3d} {row['state']:<9} val "
                           f"{'-' if val is None else f'{val:.2%}'} after {row['epochs_run']} epochs, "
                           f"{row['seconds'] or 0:.0f} s{best_text}: {params}", highlight=False)  # fmt: skip
        if self.progress is not None:
            self.progress.advance(self.task)
