"""Thin Celery tasks: primitive ids in, one domain call, follow-ups published after commit."""
from __future__ import annotations

from celery import shared_task

from shared import dispatch
from shared.flows import inbox, ledger
from shared.logs import log_context
from workers.app import publish


def _run(task, fn, *args, **ids):
    with log_context(task_id=task.request.id, **ids):
        publish(task.app, fn(task.app.relay_runtime, *args))


@shared_task(name=dispatch.PROCESS_NOTIFICATION, bind=True)
def process_notification_task(self, notification_id: int) -> None:
    """Process one inbox row."""
    _run(self, inbox.process_notification, notification_id, notification_id=notification_id)


@shared_task(name=dispatch.FETCH_PAGE, bind=True)
def fetch_page_task(self, run_id: int) -> None:
    """Fetch and claim the next page of a campaign run."""
    _run(self, ledger.fetch_next_page, run_id, run_id=run_id)


@shared_task(name=dispatch.GRANT_BATCH, bind=True)
def grant_batch_task(self, run_id: int | None, grant_ids: list[int]) -> None:
    """Deliver a batch of claimed grants to the bonus system."""
    _run(self, ledger.deliver_grants, run_id, grant_ids, run_id=run_id)


@shared_task(name=dispatch.SWEEP, bind=True)
def sweep_task(self) -> None:
    """Re-enqueue unfinished work whose task was lost."""
    _run(self, inbox.sweep)
