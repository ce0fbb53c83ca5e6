"""One template or bundle as the renderer sees it: its state machine, its status, its output.

``Target`` is the unit the renderer (``service.py``) schedules and the change-command task
(``commands.py``) serves; ``TargetState`` and ``TRANSITIONS`` are its whole life (decision 8);
``TargetStatus`` is what ``status`` and the metrics show of it, never a value.
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import trio

from agentd.config import BundleConfig, TemplateConfig
from agentd.readmodel import COUNTER, metric
from agentd.render.outputs import Output, output_for

log = logging.getLogger("agentd.render")


@dataclass
class TargetStatus:
    """What ``status`` shows for one template or bundle, kept by its render task (mutable);
    ``statistics()`` hands out frozen ``TargetStatistics`` copies. Never a value."""

    renders: int = 0
    writes: int = 0
    failures: int = 0
    drift_repairs: int = 0
    last_error: str | None = None
    last_ok_at: float | None = None
    command_runs: int = 0
    command_failures: int = 0
    last_command_error: str | None = None
    render_seconds: float = 0.0          # total time spent rendering and writing
    command_seconds: float = 0.0         # total time commands ran


@dataclass(frozen=True)
class TargetStatistics:
    """One template's or bundle's counters at one moment; each ``metric`` field is a series
    labelled by the target (its destination)."""

    renders: int = metric("Renders attempted", COUNTER,
                          name="agentd_template_renders", default=0)
    writes: int = metric("Renders that changed the file(s) on disk", COUNTER,
                         name="agentd_template_writes", default=0)
    failures: int = metric("Renders or writes that failed (the last good file stayed)", COUNTER,
                           name="agentd_template_failures", default=0)
    drift_repairs: int = metric("Files written back after someone else changed them", COUNTER,
                                name="agentd_template_drift_repairs", default=0)
    last_error: str | None = None
    last_ok_at: float | None = None
    command_runs: int = metric("Change commands run", COUNTER,
                               name="agentd_template_command_runs", default=0)
    command_failures: int = metric("Change commands that failed or timed out", COUNTER,
                                   name="agentd_template_command_failures", default=0)
    last_command_error: str | None = None
    render_seconds: float = metric("Time spent rendering and writing", COUNTER,
                                   name="agentd_template_render_seconds", default=0.0)
    command_seconds: float = metric("Time change commands ran", COUNTER,
                                    name="agentd_template_command_seconds", default=0.0)

    @property
    def ok(self) -> bool:
        """The last render succeeded (and there was one)."""
        return self.last_error is None and self.last_ok_at is not None


class TargetState(enum.Enum):
    """Where a target's render task is (h11 ``_state.py`` style; ``TRANSITIONS`` is the whole
    machine, ``Target.to`` refuses anything else)::

        IDLE --render--> RENDERING --write--> WRITING --output event--> WRITING_RECHECK
          ^                 |  ^                 |                          |  (more events)
          +---ended---------+  +----written------+--------------------------+

    - ``IDLE``: waiting for a request (or for a backoff to pass). Input changes mark it.
    - ``RENDERING``: reading inputs, rendering; an input change is not marked now but compared
      when the render ends (``Renderer._render_target``).
    - ``WRITING``: its files are being written; an event on them is our own write, probably.
    - ``WRITING_RECHECK``: an event on its files arrived while writing: compare the fingerprint
      once the write is done (someone else may have written too).
    """

    IDLE = "idle"
    RENDERING = "rendering"
    WRITING = "writing"
    WRITING_RECHECK = "writing, recheck after"


TRANSITIONS: dict[TargetState, frozenset[TargetState]] = {
    TargetState.IDLE: frozenset({TargetState.RENDERING}),
    TargetState.RENDERING: frozenset({TargetState.WRITING, TargetState.IDLE}),
    TargetState.WRITING: frozenset({TargetState.WRITING_RECHECK, TargetState.RENDERING}),
    TargetState.WRITING_RECHECK: frozenset({TargetState.WRITING_RECHECK,
                                            TargetState.RENDERING}),
}
WRITING_STATES = frozenset({TargetState.WRITING, TargetState.WRITING_RECHECK})


@dataclass(eq=False)
class Target:
    """One ``[[template]]`` or ``[[bundle]]`` and its state.

    ``state`` is the render task's progress. Beside it, three things that are not states:
    ``urgent`` is a request flag (the pending request came from something other than drift, so
    it is not rate-limited), set at any time, in any state, by ``mark``; ``attempted`` is data
    (the input versions the last attempt saw, None before one); ``attempted_once`` is a one-way
    latch that ``wait_first_pass`` waits on. Lifetime: its task runs inside ``cancel``, which a
    reload that removes or changes the target cancels.
    """

    config: TemplateConfig | BundleConfig
    status: TargetStatus = field(default_factory=TargetStatus)
    state: TargetState = TargetState.IDLE
    attempted: dict[str, int] | None = None       # input versions of the last attempt
    attempted_once: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event = field(default_factory=trio.Event)
    command_wake: trio.Event = field(default_factory=trio.Event)
    refs: list[str] = field(default_factory=list)
    # With no ``allow`` list in its config: the secrets its text named at its first render
    # after a (re)load. A source edited later that names another secret is refused until the
    # admin reloads (issue 13 item 1): a changed file on disk cannot reach new secrets.
    baseline: frozenset[str] | None = None
    written: tuple[int, ...] | None = None          # lstat fingerprint after our last write
    last_render: float = -math.inf
    urgent: bool = True                             # False: only drift asked for a render
    first_change: float | None = None
    last_change: float = 0.0
    cancel: trio.CancelScope = field(default_factory=trio.CancelScope)
    output: Output = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.output = output_for(self.config)

    def to(self, state: TargetState) -> None:
        """Move to ``state``; raises RuntimeError (a bug) for a transition not in the table."""
        if state not in TRANSITIONS[self.state]:
            raise RuntimeError(f"{self.key}: target cannot go from {self.state.name} to "
                               f"{state.name}")
        self.state = state

    @property
    def key(self) -> str:
        return self.output.key

    @property
    def directory(self) -> Path:
        return self.output.directory

    def texts(self) -> dict[str, str]:
        """File name -> template text (reads ``source``: blocking, call from a thread)."""
        return self.output.texts()

    def mark(self, reason: str, *, drift: bool = False) -> None:
        """Ask for a render; one asked for only because of drift is rate-limited."""
        log.debug("render requested", extra={"target": self.key, "reason": reason})
        if not drift:
            self.urgent = True
        self.wake.set()

    def fingerprint(self) -> tuple[int, ...] | None:
        """A cheap lstat-based fingerprint of what is on disk now (for drift detection)."""
        return self.output.fingerprint()
