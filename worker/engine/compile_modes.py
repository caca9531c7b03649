"""How the DiT blocks are compiled, by name (a profile's `compile_mode`): extra torch.compile arguments.

  ""          torch.compile's defaults.
  tuned       inductor times a few tilings of each generated kernel (coordinate descent) and keeps the
              fastest; its choices go to the compile cache with the kernels.
  persistent  row reductions up to PERSISTENT_ROW_MAX values wide keep the whole row in registers and
              read it once. Inductor does that only up to 1024 values; a wider row it reduces in a
              loop and then reads again to use the result. The DiT's norms and the fp8 scaling of their
              output reduce rows of 3840 values.

Not offered (why each was dropped is in docs/performance.md):
  - "max-autotune-no-cudagraphs": timing matmul templates makes a first image take minutes.
  - CUDA-graph modes: each block's weights sit at other addresses, so each block would record a graph
    of its own.
  - dynamic=True: the blocks still make several graphs.
  - inductor's multi_kernel: a second process compiling the same blocks from a filled compile cache
    fails in inductor, and a worker's fast start needs that cache.
"""
from __future__ import annotations

import functools

PERSISTENT_ROW_MAX = 4096
BLOCK_COMPILE_MODES = ("", "tuned", "persistent")


def check_mode(mode: str) -> None:
    """Raises ValueError naming the known modes unless `mode` is one."""
    if mode not in BLOCK_COMPILE_MODES:
        raise ValueError(f"unknown block compile mode {mode!r} (known: {', '.join(map(repr, BLOCK_COMPILE_MODES))})")


def block_compile_args(mode: str) -> dict:
    """torch.compile keyword arguments for the DiT blocks in compile mode `mode`. For "persistent" this
    also widens inductor's persistent reductions in this process (install_persistent_reductions)."""
    check_mode(mode)
    if mode == "tuned":
        return {"options": {"coordinate_descent_tuning": True}}
    if mode == "persistent":
        install_persistent_reductions()
        # The marker only puts the choice into the compile cache's key: kernels compiled without it are
        # not loaded in its place, nor the other way round.
        return {"options": {"post_grad_custom_post_pass": _persistent_marker()}}
    return {}


@functools.cache
def _persistent_marker():
    from torch._inductor.custom_graph_pass import CustomGraphPass

    class PersistentReductionsMarker(CustomGraphPass):
        def __call__(self, graph) -> None:
            return None

        def uuid(self) -> str:
            return f"zfarm-persistent-reductions-{PERSISTENT_ROW_MAX}"

    return PersistentReductionsMarker()


@functools.cache
def install_persistent_reductions() -> None:
    """From now on, inductor in this process compiles inner row reductions of up to PERSISTENT_ROW_MAX
    values as persistent reductions (one read of the row), as well as those its own rule picks."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WidePersistentReductions(InductorChoices):
        def should_use_persistent_reduction(self, features, cooperative_reduction, *args, **kwargs) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction, *args, **kwargs):
                return True
            if (not config.triton.persistent_reductions or cooperative_reduction
                    or features.get_reduction_hint() != ReductionHint.INNER):
                return False
            return V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROW_MAX)

    V.set_choices_handler(WidePersistentReductions())
