"""The saga engine: start a saga, apply a service's reply, decide what to send next, and what a
person may do to a saga.

Layout (docs/ARCHITECTURE.md, "The engine's layout"):

- `run`: the run plumbing: the locked saga, its steps and events (`Run`, `locked`), leases,
  commands, parking;
- `replies`: applying a service's reply (and an expired lease) to a step;
- `flow`: what the coordinated styles share (start ready steps, unwind in reverse order);
- `lifecycle`: start, the sweeper's verdicts, parking a broken saga;
- `actions`: cancel, retry, skip;
- `style`: the style registry and its interface; `styles/`: one module per style.

What to do next is decided from the stored state alone (the style's `advance`), so a redelivered
reply, a restarted worker, the sweeper or an operator can call it again and get the same answer.
"""

from ..definitions import for_saga, get_definition
from ..exceptions import OperationNotAllowed
from . import style
from .actions import saga_cancel, saga_retry, saga_skip
from .lifecycle import (
    saga_advance,
    saga_deadline_expire,
    saga_park_broken,
    saga_start,
    saga_start_many,
    step_lease_expire,
)
from .replies import reply_handle, reply_handle_many
from .run import CANCELLED, DB, DONE, IN_FLIGHT, State, attempt_in_flight
from .styles import choreography, orchestrated, tcc  # noqa: F401  (each registers its style)
from .styles.choreography import track

__all__ = [
    "CANCELLED",
    "DB",
    "DONE",
    "IN_FLIGHT",
    "OperationNotAllowed",
    "State",
    "attempt_in_flight",
    "for_saga",
    "get_definition",
    "reply_handle",
    "reply_handle_many",
    "saga_advance",
    "saga_cancel",
    "saga_deadline_expire",
    "saga_park_broken",
    "saga_retry",
    "saga_skip",
    "saga_start",
    "saga_start_many",
    "step_lease_expire",
    "style",
    "track",
]
