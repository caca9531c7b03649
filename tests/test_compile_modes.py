"""Block compile modes (worker.engine.compile_modes): the arguments each gives torch.compile, and the wider
persistent reductions of the "persistent" mode, decided on inductor's own size arithmetic."""
from __future__ import annotations

import pytest
import sympy
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

from worker.engine import compile_modes


class Reduction:
    """The two things inductor's persistent-reduction rule reads from a kernel's features."""

    def __init__(self, row_values: int, hint: ReductionHint):
        self.reduction_numel = sympy.Integer(row_values)
        self.numel = sympy.Integer(4224)
        self.hint = hint

    def get_reduction_hint(self) -> ReductionHint:
        return self.hint


class Graph:
    sizevars = SizeVarAllocator()


def persistent(row_values: int, hint: ReductionHint = ReductionHint.INNER) -> bool:
    with V.set_graph_handler(Graph()):
        return V.choices.should_use_persistent_reduction(Reduction(row_values, hint), False)


def test_the_persistent_mode_reads_rows_of_the_dit_width_once_but_leaves_wider_and_strided_rows_looped():
    compile_modes.block_compile_args("persistent")
    assert persistent(128) and persistent(1024)  # inductor's own rule
    assert persistent(3840) and persistent(compile_modes.PERSISTENT_ROW_MAX)
    assert not persistent(10240)
    assert not persistent(3840, ReductionHint.DEFAULT)


def test_the_persistent_mode_puts_its_choice_into_the_compile_cache_key():
    args = compile_modes.block_compile_args("persistent")
    marker = args["options"]["post_grad_custom_post_pass"]
    assert marker.uuid() == f"zfarm-persistent-reductions-{compile_modes.PERSISTENT_ROW_MAX}"
    assert marker(object()) is None  # it leaves the graph alone
    assert compile_modes.block_compile_args("") == {}
    assert compile_modes.block_compile_args("tuned") == {"options": {"coordinate_descent_tuning": True}}


def test_an_unknown_block_compile_mode_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown block compile mode 'multi_kernel'.*'persistent'"):
        compile_modes.block_compile_args("multi_kernel")
