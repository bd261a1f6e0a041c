"""Recipes: ``quantbench run recipe.yaml`` — quantize, evaluate, gate and upload in one file.

>>> recipe = Recipe.load("examples/recipe.yaml")  # doctest: +SKIP
>>> report = run_recipe(recipe)                     # doctest: +SKIP
"""
from __future__ import annotations

from quantbench.recipes.run import (BaselineReport, JobReport, RecipeReport,
                                    render_recipe_table, run_recipe)
from quantbench.recipes.schema import (Evaluation, Gate, Job, PlannedJob, Recipe, RecipeError,
                                       Upload)

__all__ = ["Recipe", "Job", "Gate", "Evaluation", "Upload", "PlannedJob", "RecipeError",
           "run_recipe", "RecipeReport", "JobReport", "BaselineReport", "render_recipe_table"]
