"""The experiment grid's definitions: cells, methods, recipes (sbs_jax.experiments.grid)."""

import pytest
from conftest import GRID_RECIPE

from sbs_jax.experiments import grid
from sbs_jax.experiments.grid import Cell, Recipe


def test_grid_is_the_cross_product_with_unique_folders():
    cells = grid.make_cells(["svamp", "cqa"], list(grid.METHODS), grid.PAPER_FRACTIONS,
                            ["t5_1_1_small", "t5_1_1_base"], [0, 1, 2, 3])
    assert len(cells) == 2 * 6 * 4 * 2 * 4
    assert len({c.name for c in cells}) == len(cells)
    assert Cell("svamp", "sbs_llm", 0.125, "t5_1_1_base", 3).name == \
        "svamp/t5_1_1_base/sbs_llm/12.5pct/seed3"


@pytest.mark.parametrize("axes, message", [
    ((["mnli"], ["sbs_llm"], [1.0], ["m"], [0]), "unknown dataset"),
    ((["svamp"], ["distill"], [1.0], ["m"], [0]), "unknown method"),
    ((["svamp"], ["sbs_llm"], [0.0], ["m"], [0]), "fractions must be in (0, 1]"),
    ((["svamp"], ["sbs_llm"], [1.0], ["m"], []), "grid is empty"),
])
def test_bad_grid_axes_are_named(axes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grid.make_cells(*axes)


def test_methods_pick_label_and_rationale_tasks():
    flags = grid.gin_flags(Cell("cqa", "sbs_gt", 0.5, "t5_1_1_tiny", 2), GRID_RECIPE, "/m")
    assert "--gin.MIXTURE_OR_TASK_NAME='cqa_label_gt'" in flags
    assert "--gin.RATIONALE_MIXTURE_NAME='cqa_rationale'" in flags
    assert "--gin.RANDOM_SEED=2" in flags and "--gin.TRAIN_STEPS=7" in flags
    flags = grid.gin_flags(Cell("cqa", "standard_distill", 1.0, "t5_1_1_tiny", 0),
                           GRID_RECIPE, "/m")
    assert "--gin.MIXTURE_OR_TASK_NAME='cqa_standard_llm'" in flags
    assert "--gin.RATIONALE_MIXTURE_NAME=None" in flags
    assert flags[:3] == ["--gin_file=gin/quickstart.gin", "--gin_file=gin/models/t5_1_1_tiny.gin",
                         "--gin_file=gin/standard_distill.gin"]
    # The single-task baseline: one task (rationale then label), its own gin file, recipe
    # bindings after it (so they may still override its target cap).
    recipe = Recipe(gin_files=("gin/quickstart.gin",), gin_bindings=("BATCH_SIZE = 8",))
    for method, task in (("single_task", "cqa_single_task"),
                         ("single_task_gt", "cqa_single_task_gt")):
        flags = grid.gin_flags(Cell("cqa", method, 1.0, "t5_1_1_tiny", 0), recipe, "/m")
        assert f"--gin.MIXTURE_OR_TASK_NAME={task!r}" in flags
        assert "--gin.RATIONALE_MIXTURE_NAME=None" in flags
        assert flags.index("--gin_file=gin/single_task.gin") < flags.index(
            "--gin_bindings=BATCH_SIZE = 8")


def test_recipe_placeholders_follow_the_model():
    recipe = Recipe(gin_files=("gin/sbs_{size}.gin",),
                    gin_bindings=("INITIAL_CHECKPOINT_PATH='/ckpt/{model}'",))
    flags = grid.gin_flags(Cell("svamp", "sbs_llm", 1.0, "t5_1_1_large", 0), recipe, "/m")
    assert flags[:2] == ["--gin_file=gin/sbs_large.gin", "--gin_file=gin/models/t5_1_1_large.gin"]
    assert "--gin_bindings=INITIAL_CHECKPOINT_PATH='/ckpt/t5_1_1_large'" in flags
    assert not any(f.startswith("--gin.TRAIN_STEPS") for f in flags)
