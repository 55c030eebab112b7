"""The shipped parameter counts (ui/param_counts.json) are what building the models gives.

The form reads the table instead of building the zoo on a server's first view (~3.5 s); regenerate it with
``python -m ui.param_counts`` when an architecture, a builder or timm changes.
"""

from __future__ import annotations

import pytest

from ui import param_counts


def test_the_table_covers_every_builtin_shape_and_architecture():
    from kd_core.models import MODELS

    table = param_counts.table()
    for shape in param_counts.shipped_shapes():
        assert set(table.get(param_counts.shape_key(*shape), {})) == set(MODELS), f"regenerate: python -m ui.param_counts ({shape})"


@pytest.mark.parametrize("shape", param_counts.shipped_shapes(), ids=lambda s: param_counts.shape_key(*s))
def test_the_table_matches_fresh_builds(shape):
    shipped = param_counts.table()[param_counts.shape_key(*shape)]
    built = {arch: param_counts.built_count(arch, *shape) for arch in shipped}
    assert shipped == built, "regenerate: python -m ui.param_counts"


def test_other_shapes_and_unknown_archs_are_built():
    assert param_counts.param_count("cnn_tiny", 7, 3, 20) == param_counts.built_count("cnn_tiny", 7, 3, 20) > 0
    assert param_counts.param_count("no_such_arch", 10, 3, 32) is None
