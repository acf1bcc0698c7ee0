"""Running the Triton kernels on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1): how
the CPU tests and the benches' `--shapes smoke` paths check the kernels' logic without a GPU.

Outside the harness.kernels package on purpose: importing that package decorates its kernels, and
@triton.jit decides then whether they are interpreted."""
from __future__ import annotations

import os


def use_interpreter() -> None:
    """Turn the interpreter on (before harness.kernels is first imported)
    and patch it for numpy >= 2.4.

    Triton 3.6's interpreter turns scalars into 1-element arrays and calls int() on them, which numpy
    >= 2.4 refuses ("only 0-dimensional arrays"); the patch reads the element instead.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    import triton.runtime.interpreter as ti

    if getattr(ti, "_harness_patched", False):
        return
    patch = ti._patch_lang_tensor

    def patched(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    ti._patch_lang_tensor = patched
    ti._harness_patched = True
