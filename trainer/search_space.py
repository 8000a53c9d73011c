"""A recipe's search space (recipes.SEARCH_SPACES) as Optuna distributions, narrowed or
fixed from the command line, and a trial's parameters written back into a recipe.

`--space` takes NAME=SPEC, one per parameter:
  lr=0.05:0.5          narrow a numeric range (log-scaled entries stay log-scaled)
  batch_size=128|256   keep only these choices ("," works too, except for widths)
  widths=16,32|32,64   widths: each choice is a comma-separated stage list
  dropout=0.1          fix the parameter: it is no longer searched
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.errors import TrainerError
from trainer.recipes import SEARCH_SPACES

# Where a parameter lives in a recipe when it is not a top-level entry.
_NESTED = {"dropout": "arch_args", "hidden": "arch_args", "widths": "arch_args", "whiten_width": "arch_args",
           "translate": "augmentation", "cutout": "augmentation", "flip": "augmentation"}  # fmt: skip


@dataclass(frozen=True)
class Param:
    name: str
    kind: str  # "log" | "float" | "int" | "choice"
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    def describe(self) -> str:
        if self.kind == "choice":
            return " | ".join(str(_scalar(c)) for c in self.choices)
        return f"{self.low:g} .. {self.high:g}" + (" (log)" if self.kind == "log" else "")


def _scalar(value):
    return ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else value


def _unscalar(name: str, value):
    return [int(v) for v in value.split(",")] if name == "widths" else value


def space_for(recipe: str) -> dict[str, Param]:
    """The recipe's search space from recipes.SEARCH_SPACES."""
    if recipe not in SEARCH_SPACES:
        raise TrainerError(f"{recipe} has no search space; recipes with one: {', '.join(SEARCH_SPACES)}")
    space = {}
    for name, (kind, *rest) in SEARCH_SPACES[recipe].items():
        if kind == "choice":
            space[name] = Param(name, kind, choices=tuple(_freeze(c) for c in rest[0]))
        else:
            space[name] = Param(name, kind, low=rest[0], high=rest[1])
    return space


def _freeze(value):
    return tuple(value) if isinstance(value, list) else value


def narrow(space: dict[str, Param], specs: list[str]) -> tuple[dict[str, Param], dict]:
    """(the narrowed space, {name: fixed value}) after the --space NAME=SPEC options."""
    space, fixed = dict(space), {}
    for spec in specs:
        name, sep, text = spec.partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not text:
            raise TrainerError(f"--space {spec!r}: expected NAME=SPEC, such as lr=0.05:0.5, batch_size=128|256 or dropout=0.1")
        if name not in space:
            known = ", ".join(sorted(set(space) | set(fixed)))
            raise TrainerError(f"--space {spec!r}: {name} is not searched for this recipe; it searches {known}")
        param = space.pop(name)
        narrowed = _narrow_one(param, text, spec)
        if isinstance(narrowed, Param):
            space[name] = narrowed
        else:
            fixed[name] = narrowed
    return space, fixed


def _narrow_one(param: Param, text: str, spec: str):
    """A narrower Param, or the fixed value."""
    if param.kind == "choice":
        separator = "|" if "|" in text or param.name == "widths" else ","
        values = [_parse_choice(param, part.strip(), spec) for part in text.split(separator)]
        return values[0] if len(values) == 1 else Param(param.name, "choice", choices=tuple(values))
    if ":" not in text:
        return _number(param, text, spec)
    low, high = (_number(param, part, spec) for part in text.split(":", 1))
    if not low < high:
        raise TrainerError(f"--space {spec!r}: the range must be low:high with low < high")
    if param.kind == "log" and low <= 0:
        raise TrainerError(f"--space {spec!r}: {param.name} is searched on a log scale; its range must be above 0")
    return Param(param.name, param.kind, low=low, high=high)


def _number(param: Param, text: str, spec: str):
    try:
        return int(text) if param.kind == "int" else float(text)
    except ValueError:
        kind = "a whole number" if param.kind == "int" else "a number"
        raise TrainerError(f"--space {spec!r}: {text!r} is not {kind}") from None


def _parse_choice(param: Param, text: str, spec: str):
    """A choice as the type of the recipe's own choices; values outside them are fine (a user may widen)."""
    sample = param.choices[0]
    try:
        if isinstance(sample, tuple):
            value = tuple(int(v) for v in text.split(","))
            if len(value) != len(sample):
                raise TrainerError(f"--space {spec!r}: this network has {len(sample)} stages, got {text!r}")
            return value
        return type(sample)(text) if not isinstance(sample, bool) else text.lower() in ("1", "true", "yes")
    except ValueError:
        raise TrainerError(f"--space {spec!r}: {text!r} is not a {type(sample).__name__} like {sample!r}") from None


def suggest(trial, space: dict[str, Param]) -> dict:
    """The trial's parameters, drawn by its sampler (their recipe form: widths as lists)."""
    params = {}
    for name, param in space.items():
        if param.kind == "choice":
            value = _unscalar(name, trial.suggest_categorical(name, [_scalar(c) for c in param.choices]))
        elif param.kind == "int":
            value = trial.suggest_int(name, int(param.low), int(param.high))
        else:
            value = trial.suggest_float(name, param.low, param.high, log=param.kind == "log")
        params[name] = value
    return params


def apply(hyper: dict, params: dict) -> dict:
    """A copy of `hyper` with the parameters set where the recipe keeps them."""
    import copy

    hyper = copy.deepcopy(hyper)
    for name, value in params.items():
        value = _unscalar(name, value) if isinstance(value, str) and name == "widths" else value
        value = list(value) if isinstance(value, tuple) else value
        if name in _NESTED:
            hyper[_NESTED[name]][name] = value
        else:
            hyper[name] = value
    return hyper
