"""DTM's sub-transaction barrier, in every service database.

`call()` runs inside the caller's `transaction.atomic(using=alias)`:

1. for a compensation, insert the *action* row first: if that insert succeeds the action never
   ran, so this is a null compensation (do nothing, succeed) and the row, stored as refused,
   blocks the action should it arrive later (hanging); if the action ran and failed, its failure
   was stored without effects, so this is a null compensation too;
2. insert the row for the current op: if it already exists this is a duplicate (or the hanging
   action), so replay the stored outcome and change nothing;
3. otherwise run the business operation in a savepoint and store its outcome. A business failure
   is stored too, with its partial effects rolled back. (A command runs it first with no
   savepoint, and on a business failure rolls its whole transaction back and runs again with
   one: see `call`.)

A command's action takes a shorter path (`call(savepoint=False)`): the operation first, then its
row with the outcome in one insert (`run_first`, `insert_outcomes`: a batch's actions share the
insert); a row already there (or any failure) rolls the whole transaction back, and the action
runs again as above.

Every insert is `INSERT ... ON CONFLICT DO NOTHING`: the unique key, not a read, decides
("change instead of check"), so concurrent duplicates serialise on the index.

An operation that calls outside the platform (a card gateway) must not hold its transaction
while the other side answers, so it spans two: `begin()` commits the action row with no outcome
(the intent), the call runs with no transaction open, and `call()` then finds that pending row,
locks it and runs the operation as if it had just inserted it. `settle()` stores the outcome of
a pending action from elsewhere (a compensation that had to finish it first), marked `settled`.

A choreographed reaction that runs out of attempts undoes its own step (`unless_answered`), or,
with nothing to undo, tells of its failure: neither if the action (or the compensation) has
stored an outcome of its own meanwhile (`answered`). Its event went out with that outcome (a second delivery of the
event, such as the tracker's nudge, ran it), so the flow has moved on and the undo would take
back what the next services already act on.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from celery.exceptions import SoftTimeLimitExceeded
from django.db import connections, transaction
from django.utils import timezone

from sagaplatform.observability import hooks as observability

from .errors import BusinessError, TransientError
from .models import Barrier

if TYPE_CHECKING:
    from .commands import Command

SagaId = uuid.UUID | str

logger = logging.getLogger(__name__)

ACTION = Barrier.Op.ACTION.value
COMPENSATE = Barrier.Op.COMPENSATE.value
CONFIRM = Barrier.Op.CONFIRM.value

REFUSED_AFTER_COMPENSATION_CODE = "compensated_before_action"
REFUSED_AFTER_COMPENSATION = {
    "status": "business_failure",
    "error": {
        "code": REFUSED_AFTER_COMPENSATION_CODE,
        "message": "The compensation arrived first; the action is refused.",
    },
}
NULL_COMPENSATION = {"status": "succeeded", "result": {}, "barrier": "null_compensation"}
# `call(unless_answered=True)`: the action answered on its own; nothing was undone or stored.
ACTION_ANSWERED = {"status": "succeeded", "result": {}, "barrier": "action_answered"}


# The database whose operation `call` is running in this context, if any (see `atomic`).
_operating: ContextVar[str | None] = ContextVar("barrier_operating", default=None)


def atomic(using: str) -> transaction.Atomic:
    """The transaction of a service function that an operation calls.

    Called by an operation that `call` runs, it joins the command's transaction with no
    savepoint of its own: there the barrier decides what a failure rolls back (the command's
    whole transaction, or the barrier's own savepoint around the operation), so a savepoint per
    service function would only cost two round trips (SAVEPOINT, RELEASE) on every command.
    Called anywhere else (the admin, the API, a test's transaction) it is
    `transaction.atomic(using=using)`, savepoint included, so a caller may catch its error and
    go on."""
    return transaction.atomic(using=using, savepoint=_operating.get() != using)


@contextmanager
def _running(using: str) -> Iterator[None]:
    token = _operating.set(using)
    try:
        yield
    finally:
        _operating.reset(token)


def _insert(using: str, saga_id: SagaId, step: str, op: str, outcome: dict[str, Any] | None) -> bool:
    return _insert_rows(using, [(saga_id, step, op, outcome)]) == 1


def _insert_rows(using: str, rows: Sequence[tuple[SagaId, str, str, dict[str, Any] | None]]) -> int:
    """Insert barrier rows (saga, step, op, outcome) in one statement, each unless its key is
    there already. Returns how many were inserted."""
    sql, values = _rows_insert(using, rows)
    with connections[using].cursor() as cursor:
        cursor.execute(sql, values)
        return int(cursor.rowcount)


def _rows_insert(using: str, rows: Sequence[tuple[SagaId, str, str, dict[str, Any] | None]]) -> tuple[str, list[Any]]:
    connection = connections[using]
    fields = {f.name: f for f in Barrier._meta.concrete_fields}
    saga_field, outcome_field, created_field = fields["saga_id"], fields["outcome"], fields["created_at"]
    # The row's time comes from the database clock (the audit compares rows written by
    # different workers); SQLite shares the process clock.
    postgres = connection.vendor == "postgresql"
    now_sql = "clock_timestamp()" if postgres else "%s"
    values: list[Any] = []
    for saga_id, step, op, outcome in rows:
        values += [
            saga_field.get_db_prep_save(saga_id, connection),
            step,
            op,
            outcome_field.get_db_prep_save(outcome, connection),
        ]
        if not postgres:
            values.append(created_field.get_db_prep_save(timezone.now(), connection))
    quote = connection.ops.quote_name
    # Only quoted identifiers from the model are interpolated; every value is a parameter.
    table = quote(Barrier._meta.db_table)
    columns = ", ".join(quote(c) for c in ("saga_id", "step", "op", "outcome", "created_at"))
    placeholders = ", ".join([f"(%s, %s, %s, %s, {now_sql})"] * len(rows))
    sql = f"INSERT INTO {table} ({columns}) VALUES {placeholders} ON CONFLICT DO NOTHING"  # noqa: S608
    return sql, values


def _action_failed(using: str, saga_id: SagaId, step: str) -> bool:
    outcome = (
        Barrier.objects.using(using)
        .filter(saga_id=saga_id, step=step, op=ACTION)
        .values_list("outcome", flat=True)
        .first()
    )
    return outcome is not None and outcome.get("status") == "business_failure"


def _store(using: str, saga_id: SagaId, step: str, op: str, outcome: dict[str, Any]) -> None:
    Barrier.objects.using(using).filter(saga_id=saga_id, step=step, op=op).update(outcome=outcome)


class Decided(BusinessError):
    """Raised by `call(savepoint=False)` when the operation's row turns out to exist already (a
    duplicate, an action a compensation refused), or when the operation failed other than for
    business reasons before the row was read (a duplicate may fail on the service's own unique
    keys): the caller rolls back and calls again with a savepoint, which reads the row first.
    As for a business failure, which the caller handles the same way."""

    code = "barrier_decided"


def call(
    *,
    using: str,
    command: Command,
    fn: Callable[..., dict[str, Any] | None],
    savepoint: bool = True,
    begun: bool = False,
    unless_answered: bool = False,
) -> dict[str, Any]:
    """Run `command`'s operation `fn` through the barrier (see the module's docstring).

    `savepoint=False` is the fast path of a command that has no row yet, almost every one: the
    action runs first, with no savepoint of its own, and its row is then inserted with its
    outcome, one round trip where inserting the row first and storing the outcome later took
    two. The unique key still decides: if the row exists, or the operation fails in any way (a
    duplicate may trip the service's own unique keys), `Decided` or the business failure
    propagates and the caller must roll its whole transaction back and call again with a
    savepoint, which reads the row first, replays it or stores a failure, and meets a real
    error again (so such a command runs twice, the first run rolled back). Two round trips
    (SAVEPOINT, RELEASE) fewer too on the path of every command that succeeds (`commands` does
    this). A concurrent
    duplicate waits on the first one's row (or its locks) and then finds the row. Compensations,
    confirms (a refusal is a transient error, never stored: a confirm already made would be
    refused again and again) and an action whose intent `begin` recorded (`begun`) read the row
    first either way.

    `unless_answered`, for a compensation: if its action has stored an outcome of its own (not
    one `settle` stored for it), undo nothing, store nothing and return `ACTION_ANSWERED`. The
    action's row is locked first, so a run of the action still in flight is waited for."""
    if not connections[using].in_atomic_block:
        raise RuntimeError("barrier.call must run inside transaction.atomic(using=...)")
    saga_id, step, op = command.saga_id, command.step, command.op
    if not savepoint and op == ACTION and not begun:
        outcome = run_first(using=using, command=command, fn=fn)
        insert_outcomes(using=using, done=[(command, outcome)])
        return outcome

    if op == COMPENSATE and _insert(using, saga_id, step, ACTION, REFUSED_AFTER_COMPENSATION):
        _insert(using, saga_id, step, COMPENSATE, NULL_COMPENSATION)
        logger.info("null compensation for %s/%s", saga_id, step)
        observability.barrier_hit(using, "null_compensation")
        return NULL_COMPENSATION
    # The insert above found the action's row, after waiting for a run of the action that was
    # writing it (a unique check waits for the row's writer). The row is read locked: no run of
    # the action can store an outcome between this read and the undo.
    if op == COMPENSATE and unless_answered and _own_answer(_locked_outcome(using, saga_id, step, ACTION)):
        logger.info("%s/%s answered on its own: not undone", saga_id, step)
        observability.barrier_hit(using, "action_answered")
        return ACTION_ANSWERED
    # The action failed, and a failure is stored without its effects: nothing to undo. (A TCC
    # cancel sent to a try still in flight that then failed ends here.)
    if (
        op == COMPENSATE
        and _action_failed(using, saga_id, step)
        and _insert(using, saga_id, step, COMPENSATE, NULL_COMPENSATION)
    ):
        observability.barrier_hit(using, "null_compensation")
        return NULL_COMPENSATION

    # An action whose intent `begin` recorded finds its row there: read (and lock) it first, and
    # insert it only if `begin` never ran (one statement where a failing insert and a read took two).
    found = _locked_outcome(using, saga_id, step, op) if begun else None
    if found is None and not _insert(using, saga_id, step, op, None):
        found = _locked_outcome(using, saga_id, step, op)
    if found is not None:
        stored = found[0]
        if stored is not None:
            logger.info("barrier replay for %s/%s/%s", saga_id, step, op)
            observability.barrier_hit(using, "hanging_refused" if stored == REFUSED_AFTER_COMPENSATION else "duplicate")
            return {**stored, "replayed": True}

    if not savepoint:
        outcome = _run_unprotected(using, command, fn)
        _store(using, saga_id, step, op, outcome)
        return outcome
    try:
        with transaction.atomic(using=using), _running(using):
            result = fn(command=command) or {}
        outcome = {"status": "succeeded", "result": result}
    except BusinessError as exc:
        if op == CONFIRM:
            # TCC's confirm must eventually succeed: a refusal now is worth another try later,
            # so it is not stored (a stored failure would be replayed to every retry).
            raise TransientError(exc.message, code=exc.code, details=exc.details) from exc
        outcome = {"status": "business_failure", "error": exc.as_dict()}
    _store(using, saga_id, step, op, outcome)
    return outcome


def answered(*, using: str, saga_id: SagaId, step: str, op: str = ACTION) -> bool:
    """Whether the step's `op` has stored an outcome of its own (an action: `_own_answer`; a
    compensation: any), deciding nothing: a run still inserting the row is waited for by an
    insert of that row that is rolled back at once (its savepoint), and a row found stays locked
    until the caller's transaction ends. Inside the caller's transaction. Counted as an
    `action_answered` hit when it has."""
    with transaction.atomic(using=using):
        if _insert(using, saga_id, step, op, None):
            transaction.set_rollback(True, using=using)
            return False
    found = _locked_outcome(using, saga_id, step, op)
    if not (_own_answer(found) if op == ACTION else bool(found and found[0] is not None)):
        return False
    observability.barrier_hit(using, "action_answered")
    return True


def _own_answer(found: tuple[dict[str, Any] | None] | None) -> bool:
    """Whether an action's row (as `_locked_outcome` reads it) holds an outcome the action stored
    itself: not pending, not refused by its compensation, not stored by `settle`."""
    outcome = found[0] if found else None
    return outcome is not None and outcome != REFUSED_AFTER_COMPENSATION and not outcome.get("settled")


def _locked_outcome(using: str, saga_id: SagaId, step: str, op: str) -> tuple[dict[str, Any] | None] | None:
    """The row's outcome, its row locked (a concurrent run of a pending action, see `begin`,
    waits for the first); None if there is no row."""
    rows = Barrier.objects.using(using).select_for_update().filter(saga_id=saga_id, step=step, op=op)
    for outcome in rows.values_list("outcome", flat=True):
        return (outcome,)
    return None


def run_first(*, using: str, command: Command, fn: Callable[..., dict[str, Any] | None]) -> dict[str, Any]:
    """The fast path's first half (`call(savepoint=False)`): a command's action, before its row.
    The caller then inserts the row with the outcome (`insert_outcomes`), in the same transaction."""
    try:
        return _run_unprotected(using, command, fn)
    except (BusinessError, SoftTimeLimitExceeded):
        raise
    except Exception as exc:
        # Perhaps the duplicate's own doing (a unique key of the service's rows, a lock): the
        # run again reads the row first, and meets this error again if it is real.
        raise Decided(
            f"{command.step}/{command.op} of saga {command.saga_id} failed before its row was read: {exc}"
        ) from exc


def insert_outcomes(*, using: str, done: list[tuple[Command, dict[str, Any]]]) -> None:
    """The fast path's second half: the rows of actions `run_first` ran, with their outcomes, in
    one INSERT (a batch's commands share it). If any row was there already, `Decided`: the
    caller rolls its transaction back and runs each command again through `call` with a
    savepoint."""
    if done:
        check_inserted(done, _insert_rows(using, [_row(command, outcome) for command, outcome in done]))


def outcomes_insert(*, using: str, done: list[tuple[Command, dict[str, Any]]]) -> tuple[str, list[Any]]:
    """`insert_outcomes`' statement, for the caller to run along with another one; it then
    passes the rows it wrote to `check_inserted`."""
    return _rows_insert(using, [_row(command, outcome) for command, outcome in done])


def check_inserted(done: list[tuple[Command, dict[str, Any]]], inserted: int) -> None:
    """`Decided` if fewer rows were inserted than actions ran (see `insert_outcomes`)."""
    if inserted < len(done):
        held = ", ".join(f"{c.step}/{c.op} of saga {c.saga_id}" for c, _ in done)
        raise Decided(f"the barrier already holds one of {held}")


def _row(command: Command, outcome: dict[str, Any]) -> tuple[SagaId, str, str, dict[str, Any]]:
    return (command.saga_id, command.step, command.op, outcome)


def _run_unprotected(using: str, command: Command, fn: Callable[..., dict[str, Any] | None]) -> dict[str, Any]:
    """The operation with no savepoint of its own; a business failure propagates (see `call`)."""
    try:
        with _running(using):
            return {"status": "succeeded", "result": fn(command=command) or {}}
    except BusinessError as exc:
        if command.op == CONFIRM:  # never stored: the caller's rollback undoes its effects
            raise TransientError(exc.message, code=exc.code, details=exc.details) from exc
        raise


def begin(*, using: str, command: Command) -> dict[str, Any] | None:
    """Record the intent of an action that calls outside the platform: its barrier row, with no
    outcome yet, committed with the caller's transaction before the call. Returns the stored
    outcome if the action already ended or was refused (then make no call), else None."""
    if not connections[using].in_atomic_block:
        raise RuntimeError("barrier.begin must run inside transaction.atomic(using=...)")
    if _insert(using, command.saga_id, command.step, ACTION, None):
        return None  # just written, with no outcome: no need to read it back
    outcome: dict[str, Any] | None = (
        Barrier.objects.using(using).get(saga_id=command.saga_id, step=command.step, op=ACTION).outcome
    )
    return outcome


def settle(*, using: str, saga_id: SagaId, step: str, outcome: dict[str, Any]) -> bool:
    """Store the outcome of a pending action, unless it has one already, marked as stored here
    (`settled`): the action itself never ran to its end, and published nothing."""
    return bool(
        Barrier.objects.using(using)
        .filter(saga_id=saga_id, step=step, op=ACTION, outcome__isnull=True)
        .update(outcome={**outcome, "settled": True})
    )
