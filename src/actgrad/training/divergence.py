"""When a training run counts as diverged: one rule, shared by the reference loop and the batched engine.

A run has diverged when a minibatch loss is not finite, or when every minibatch loss over a
window of steps stays above a multiple of the loss of a uniform guess, ``-ln(1/27)``. A tanh
net's loss stays finite however badly it blows up (tanh bounds the activations), so the
second rule is what catches a net that is stuck, not one that is merely badly initialised:
the lecture's ``original`` variant starts at 27.9 (8.5 x the uniform guess) and is below 5
within a few hundred steps, while a deep net without BatchNorm at gain 1000 and lr 100 sits
near 579 (176 x) for good. The window asks for a sustained failure, never one bad minibatch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actgrad.data import EXPECTED_INIT_LOSS

NON_FINITE = "non-finite loss"


@dataclass(frozen=True)
class Divergence:
    step: int  # where the rule fired: the non-finite loss, or the last step of the window above the limit
    rule: str  # which rule fired, in words


@dataclass(frozen=True)
class DivergenceRule:
    loss_multiple: float = 10.0
    window: int = 1000

    def __post_init__(self):
        if not self.loss_multiple > 0:
            raise ValueError(f"divergence loss_multiple must be positive, not {self.loss_multiple}")
        if self.window < 1:
            raise ValueError(f"divergence window must be at least 1 step, not {self.window}")

    @property
    def loss_limit(self) -> float:
        return self.loss_multiple * EXPECTED_INIT_LOSS

    @property
    def window_rule(self) -> str:
        return (f"loss above {self.loss_multiple:g} × the uniform guess ({self.loss_limit:.2f}) "
                f"for {self.window:,} steps")

    def history(self) -> int:
        """How many steps before a checked stretch :meth:`first` must also see."""
        return self.window - 1

    def first(self, losses: torch.Tensor, start: int, check_from: int) -> list[Divergence | None]:
        """For each column of ``losses`` (steps ``start, start + 1, ...`` by models, or one run's 1-d
        losses), the first step at or after ``check_from`` where the run counts as diverged, or None.

        Costs one host synchronisation when nothing is wrong: this is called every hundred steps.
        """
        one_run = losses.dim() == 1
        losses = losses.view(-1, 1) if one_run else losses
        new = losses[check_from - start:]
        limit = self.loss_limit
        if not bool((~torch.isfinite(new) | (new > limit)).any()):
            found: list[Divergence | None] = [None] * losses.shape[1]
        else:
            found = [self._first_in_column(col, start, check_from) for col in losses.detach().cpu().t()]
        return found[:1] if one_run else found

    def _first_in_column(self, losses: torch.Tensor, start: int, check_from: int) -> Divergence | None:
        offset = check_from - start
        bad = (~torch.isfinite(losses[offset:])).nonzero()
        first_bad = int(bad[0]) + check_from if len(bad) else None
        # Length of the stretch above the limit that ends at each step.
        steps = torch.arange(len(losses))
        below = torch.where(losses > self.loss_limit, torch.full_like(steps, -1), steps)
        run_length = steps - torch.cummax(below, 0).values
        full = (run_length[offset:] >= self.window).nonzero()
        first_full = int(full[0]) + check_from if len(full) else None
        if first_bad is not None and (first_full is None or first_bad <= first_full):
            return Divergence(first_bad, NON_FINITE)
        if first_full is not None:
            return Divergence(first_full, self.window_rule)
        return None
