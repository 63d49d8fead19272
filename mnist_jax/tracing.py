"""`--profile-steps A:B`: a `jax.profiler` trace of training steps A..B (1-based, global) in `WORKDIR/profile/`.

Steps run a compiled call at a time, so the trace holds every call that contains a step of A..B
(with `--steps-per-call 1`, exactly those steps). Open it with TensorBoard's profile plugin
(`tensorboard --logdir WORKDIR/profile`, with tensorboard-plugin-profile installed) or load
`WORKDIR/profile/plugins/profile/*/*.trace.json.gz` (or the `perfetto_trace.json.gz`) in ui.perfetto.dev.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax



class StepTrace:
    """Starts a trace before the first call that holds a step of [first, last], stops it after the last one."""

    def __init__(self, steps: tuple[int, int] | None, outdir: str | Path) -> None:
        """`steps`: (A, B), 1-based and inclusive (`config.parse_step_range`); None traces nothing."""
        self.steps, self.outdir = steps, Path(outdir)
        self.tracing = self.done = False

    def before_call(self, start: int, n: int) -> None:
        """The next call runs global steps start+1 .. start+n."""
        if self.steps is None or self.tracing or self.done:
            return
        first, last = self.steps
        if start + 1 <= last and start + n >= first:
            self.outdir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.outdir), create_perfetto_trace=True)
            self.tracing = True

    def after_call(self, state: Any, end: int) -> None:
        """The call that ended at global step `end` was dispatched; stop once it passed the last step."""
        if self.tracing and end >= self.steps[1]:
            self.stop(state)

    def __enter__(self) -> "StepTrace":
        return self

    def __exit__(self, *exc: Any) -> None:  # an error or a stop mid-trace: end it, keep what it holds
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False

    def stop(self, state: Any) -> None:
        if self.tracing:
            jax.block_until_ready(state)  # the traced calls' device work is in the trace
            jax.profiler.stop_trace()
            self.tracing, self.done = False, True
