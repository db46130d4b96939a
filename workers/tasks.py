"""Thin Celery tasks: primitive ids in, one domain call, follow-ups published after commit."""
from __future__ import annotations

from celery import Celery, shared_task

from shared import dispatch
from shared.broker import publish
from shared.db import once_more_if_stale
from shared.flows import conditional, deactivation, inbox, paging, runs, sweeper
from shared.flows.grants import GRANTS
from shared.flows.revokes import REVOKES
from shared.flows.routing import FLOWS
from shared.flows.sends import SENDS
from shared.logs import log_context


def _run(task, fn, *args, **ids):
    with log_context(task_id=task.request.id, **ids):
        # workers skip the pre-ping round trip; every domain step is safe to replay
        publish(task.app, once_more_if_stale(fn, task.app.relay_runtime, *args))


@shared_task(name=dispatch.PROCESS_NOTIFICATION, bind=True)
def process_notification_task(self, notification_id: int) -> None:
    """Process one inbox row."""
    _run(self, inbox.process_notification, notification_id, notification_id=notification_id)


@shared_task(name=dispatch.FETCH_PAGE, bind=True)
def fetch_page_task(self, run_id: int) -> None:
    """Fetch and claim the next page of a campaign run."""
    _run(self, paging.fetch_next_page, run_id, FLOWS, run_id=run_id)


@shared_task(name=dispatch.GRANT_BATCH, bind=True)
def grant_batch_task(self, run_id: int | None, grant_ids: list[int]) -> None:
    """Deliver a batch of claimed grants to the bonus system."""
    _run(self, GRANTS.deliver, run_id, grant_ids, run_id=run_id)


@shared_task(name=dispatch.SEND_BATCH, bind=True)
def send_batch_task(self, run_id: int | None, send_ids: list[int]) -> None:
    """Deliver a batch of claimed sends to the send service."""
    _run(self, SENDS.deliver, run_id, send_ids, run_id=run_id)


@shared_task(name=dispatch.REVOKE_BATCH, bind=True)
def revoke_batch_task(self, run_id: int | None, revoke_ids: list[int]) -> None:
    """Deliver a batch of claimed revokes to the bonus system."""
    _run(self, REVOKES.deliver, run_id, revoke_ids, run_id=run_id)


@shared_task(name=dispatch.SWEEP, bind=True)
def sweep_task(self) -> None:
    """Re-enqueue unfinished work whose task was lost."""
    _run(self, sweeper.sweep)


@shared_task(name=dispatch.RELEASE_DUE, bind=True)
def release_due_task(self) -> None:
    """Release timed sends whose time has come."""
    _run(self, sweeper.release_due)


@shared_task(name=dispatch.REPORT_METRICS, bind=True)
def report_metrics_task(self, run_id: int, attempt: int = 1) -> None:
    """Report a finished send run's sends per template to Optimove."""
    _run(self, runs.report_metrics, run_id, attempt, run_id=run_id)


@shared_task(name=dispatch.REPORT_STATUSES, bind=True)
def report_statuses_task(self, run_id: int) -> None:
    """Report a conditional run's customer statuses to Optimove."""
    _run(self, conditional.report_statuses, run_id, run_id=run_id)


@shared_task(name=dispatch.DEACTIVATE, bind=True)
def deactivate_task(self) -> None:
    """Revoke the promotions of Optimove actions that ended (with RELAY_DEACTIVATION)."""
    _run(self, deactivation.deactivate)


def register(app: Celery) -> None:
    """Bind the shared tasks to `app` (each one must be known by its name from `dispatch.TASKS`)."""
    missing = set(dispatch.TASKS) - set(app.tasks.keys())
    if missing:
        raise RuntimeError(f"tasks without an implementation: {sorted(missing)}")
