"""conditional execution (flow 4): run deadlines, expired grants, per-customer promotion statuses

A conditional run carries its `deadline` (ClearanceRequiredBy) and may end `deadline_missed`.
A grant the deadline overtook before it was sent is `expired` (never sent). Each customer's
outcome goes to `promotion_statuses` once its codes are settled, and is reported to Optimove
(UpdateCustomerPromotionStatus) from there.

Revision ID: 0006
Revises: 0005
"""
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE campaign_runs DROP CONSTRAINT campaign_runs_status_check;
    ALTER TABLE campaign_runs ADD CONSTRAINT campaign_runs_status_check
        CHECK (status IN ('running', 'done', 'failed', 'cancelled', 'deadline_missed'));
    ALTER TABLE campaign_runs
        ADD COLUMN deadline timestamptz,
        ADD COLUMN reported_true integer NOT NULL DEFAULT 0,
        ADD COLUMN reported_false integer NOT NULL DEFAULT 0,
        ADD COLUMN expired integer NOT NULL DEFAULT 0;
    CREATE INDEX campaign_runs_deadline ON campaign_runs (deadline) WHERE status = 'running' AND deadline IS NOT NULL;

    ALTER TABLE grants DROP CONSTRAINT grants_status_check;
    ALTER TABLE grants ADD CONSTRAINT grants_status_check
        CHECK (status IN ('claimed', 'granted', 'rejected', 'failed', 'expired'));

    CREATE TABLE promotion_statuses (
        run_id       bigint      NOT NULL REFERENCES campaign_runs(id),
        campaign_id  bigint      NOT NULL,
        customer_id  text        NOT NULL,
        status       boolean     NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        reported_at  timestamptz,
        PRIMARY KEY (run_id, customer_id)
    );
    CREATE INDEX promotion_statuses_unreported ON promotion_statuses (run_id, created_at) WHERE reported_at IS NULL;
    """)


def downgrade() -> None:
    op.execute(r"""
    DROP TABLE promotion_statuses;
    UPDATE grants SET status = 'failed' WHERE status = 'expired';
    ALTER TABLE grants DROP CONSTRAINT grants_status_check;
    ALTER TABLE grants ADD CONSTRAINT grants_status_check
        CHECK (status IN ('claimed', 'granted', 'rejected', 'failed'));
    DROP INDEX campaign_runs_deadline;
    ALTER TABLE campaign_runs DROP COLUMN deadline, DROP COLUMN reported_true, DROP COLUMN reported_false,
        DROP COLUMN expired;
    UPDATE campaign_runs SET status = 'failed' WHERE status = 'deadline_missed';
    ALTER TABLE campaign_runs DROP CONSTRAINT campaign_runs_status_check;
    ALTER TABLE campaign_runs ADD CONSTRAINT campaign_runs_status_check
        CHECK (status IN ('running', 'done', 'failed', 'cancelled'));
    """)
