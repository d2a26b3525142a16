"""What the per-token decoding steps of the LLM and the speech decoder share when they run on
a preallocated (static) KV cache, optionally through `torch.compile`.

A step of an 8B model, or of the speech decoder after it, launches hundreds of small kernels
from Python. A static cache gives every step the same shapes, which is what lets
`torch.compile(mode="reduce-overhead")` capture a step once as a CUDA graph and replay it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import PretrainedConfig, StaticCache

CompileBackend = str | Callable[..., Any]


class StaticCacheSlot:
    """One preallocated StaticCache, lent to one reply at a time and reset for the next.

    Reusing the buffers matters for compiled steps: a CUDA graph is recorded against fixed
    addresses, so a fresh cache per reply would mean a fresh recording per reply. A new reply
    always gets the cache (an interrupted reply may not have been closed yet); the reply it was
    taken from fails on its next step instead of reading another reply's keys.
    """

    def __init__(self, config: PretrainedConfig, capacity: int) -> None:
        self.config = config
        self.capacity = capacity
        self._cache: StaticCache | None = None
        self._holder: object | None = None

    def borrow(self, holder: object) -> StaticCache:
        """The emptied cache, now held by `holder` (the reply's own state object)."""
        if self._cache is None:
            self._cache = StaticCache(config=self.config, max_cache_len=self.capacity)
        else:
            # The buffers were filled under inference mode; only there may they be changed in place.
            with torch.inference_mode():
                self._cache.reset()
        self._holder = holder
        return self._cache

    def check(self, holder: object) -> None:
        """Refuse a step of a reply whose cache a newer reply has taken."""
        if holder is not self._holder:
            raise RuntimeError("this reply's static KV cache was taken by a newer reply; one reply at a time")


class CompiledStep:
    """A decoding step `torch.compile`d for fixed shapes (CUDA graphs with inductor).

    Compiled at its first call, so a torch that cannot compile fails there, inside the
    caller's warm-up and its fallback, not while the pipeline is being built.
    """

    def __init__(self, step: Callable[..., tuple[torch.Tensor, ...]], backend: CompileBackend = "inductor") -> None:
        self.step = step
        self.backend = backend
        self._compiled: Callable[..., tuple[torch.Tensor, ...]] | None = None

    def __call__(self, device: torch.device, *args: Any) -> tuple[torch.Tensor, ...]:
        """Run the compiled step on `args` (tensors on `device`); outputs copied out (see run_compiled)."""
        if self._compiled is None:
            options = {"mode": "reduce-overhead"} if self.backend == "inductor" else {}
            self._compiled = torch.compile(self.step, backend=self.backend, fullgraph=False, dynamic=False, **options)
        return run_compiled(self._compiled, device, *args)


def run_compiled(step: Callable[..., Any], device: torch.device, *args: Any) -> tuple[torch.Tensor, ...]:
    """Call a compiled step and copy its outputs out: a CUDA graph reuses its output buffers on
    the next replay, and the caller keeps these (hidden states feed the speech decoder)."""
    if device.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    return tuple(t.clone() for t in step(*args))
