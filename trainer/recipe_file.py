"""Recipes as JSON files: what `trainer tune` writes for its best trial and what
`trainer train --recipe-file` reads.

A recipe file names the recipe it starts from (trainer/recipes.py, which fixes the network)
and holds the full set of hyperparameters, so it reads on its own and keeps meaning the
same run when the built-in recipe later changes:

    {"format": "ensemble-serving-recipe/1", "recipe": "lenet", "dataset": "mnist",
     "hyperparameters": {...every entry of `trainer recipes lenet`...}, "tuned": {...}}

"tuned" (optional, free-form) records where the numbers came from (study, trial, val accuracy).
"""

from __future__ import annotations

import json
from pathlib import Path

from trainer.errors import TrainerError
from trainer.recipes import RECIPES, get_recipe

FORMAT = "ensemble-serving-recipe/1"


def recipe_file_payload(recipe: str, hyper: dict, tuned: dict | None = None) -> dict:
    """The JSON document for `hyper` (a full recipe of `recipe`, such as get_recipe's with changes)."""
    entries = {k: v for k, v in hyper.items() if k != "recipe"}
    return {"format": FORMAT, "recipe": recipe, "dataset": entries["dataset"], "hyperparameters": entries,
            **({"tuned": tuned} if tuned else {})}  # fmt: skip


def write_recipe_file(path: Path, recipe: str, hyper: dict, tuned: dict | None = None) -> None:
    Path(path).write_text(json.dumps(recipe_file_payload(recipe, hyper, tuned), indent=2) + "\n")


def load_recipe_file(path: Path) -> tuple[str, dict]:
    """(recipe name, full hyperparameters) from a recipe file; a precise error for anything off."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as error:
        raise TrainerError(f"--recipe-file {path}: cannot read it ({error.strerror})") from None
    except json.JSONDecodeError as error:
        raise TrainerError(f"--recipe-file {path}: not JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise TrainerError(f"--recipe-file {path}: expected a JSON object with \"format\": \"{FORMAT}\" "
                           "(as `trainer tune` writes)")  # fmt: skip
    recipe, entries = document.get("recipe"), document.get("hyperparameters")
    if recipe not in RECIPES:
        raise TrainerError(f"--recipe-file {path}: \"recipe\" must be one of {', '.join(RECIPES)}, got {recipe!r}")
    if not isinstance(entries, dict):
        raise TrainerError(f"--recipe-file {path}: \"hyperparameters\" must be an object of recipe entries")
    hyper = get_recipe(recipe)
    unknown = sorted(set(entries) - set(hyper))
    if unknown:
        raise TrainerError(f"--recipe-file {path}: unknown recipe entries {', '.join(unknown)} "
                           f"(a {recipe} recipe has: {', '.join(sorted(hyper))})")  # fmt: skip
    for nested in ("arch_args", "augmentation"):
        if nested in entries and set(entries[nested]) - set(hyper[nested]):
            extra = ", ".join(sorted(set(entries[nested]) - set(hyper[nested])))
            raise TrainerError(f"--recipe-file {path}: unknown {nested} entries {extra} "
                               f"(expected some of {', '.join(sorted(hyper[nested]))})")  # fmt: skip
        hyper[nested].update(entries.pop(nested, {}))
    hyper.update(entries)
    return recipe, hyper
