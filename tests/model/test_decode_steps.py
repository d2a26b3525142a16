"""What the LLM's and the speech decoder's static/compiled steps share."""

from __future__ import annotations

import torch

from omni_cli.model.decode_steps import run_compiled


def test_compiled_outputs_are_copied_out_of_buffers_the_next_call_reuses() -> None:
    # A CUDA graph writes every replay into the same output buffers; this step does the same.
    buffer = torch.zeros(3)

    def step(x: torch.Tensor) -> tuple[torch.Tensor]:
        buffer.copy_(x)
        return (buffer,)

    first = run_compiled(step, torch.device("cpu"), torch.ones(3))[0]
    second = run_compiled(step, torch.device("cpu"), torch.full((3,), 2.0))[0]
    assert first.tolist() == [1.0, 1.0, 1.0]  # not overwritten by the second call
    assert second.tolist() == [2.0, 2.0, 2.0]
