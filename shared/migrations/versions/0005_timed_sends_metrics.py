"""timed sends (flow 1) and metrics reports

A send whose ScheduledTime is still ahead is stored `waiting` and released (`claimed`) by the
beat job when due; two partial indexes serve that job and the run-completion check. Runs get
`metrics_reported_at` / `metrics_error` for the UpdateCampaignMetrics report of a send run.

Revision ID: 0005
Revises: 0004
"""
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE sends DROP CONSTRAINT sends_status_check;
    ALTER TABLE sends ADD CONSTRAINT sends_status_check
        CHECK (status IN ('waiting', 'claimed', 'sent', 'rejected', 'failed'));
    CREATE INDEX sends_waiting_due ON sends (scheduled_time) WHERE status = 'waiting';
    CREATE INDEX sends_waiting_run ON sends (run_id) WHERE status = 'waiting';
    ALTER TABLE campaign_runs
        ADD COLUMN metrics_reported_at timestamptz,
        ADD COLUMN metrics_error text;
    """)


def downgrade() -> None:
    op.execute(r"""
    ALTER TABLE campaign_runs DROP COLUMN metrics_reported_at, DROP COLUMN metrics_error;
    DROP INDEX sends_waiting_run;
    DROP INDEX sends_waiting_due;
    UPDATE sends SET status = 'claimed' WHERE status = 'waiting';
    ALTER TABLE sends DROP CONSTRAINT sends_status_check;
    ALTER TABLE sends ADD CONSTRAINT sends_status_check
        CHECK (status IN ('claimed', 'sent', 'rejected', 'failed'));
    """)
