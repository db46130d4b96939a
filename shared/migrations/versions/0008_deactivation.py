"""promotion deactivation: each grant's ActionID, and the dates whose ended actions were processed

Revision ID: 0008
Revises: 0007
"""
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE grants ADD COLUMN action_id bigint;
    CREATE INDEX grants_customer_action ON grants (customer_id, action_id) WHERE action_id IS NOT NULL;
    CREATE TABLE deactivations (
        date         date        PRIMARY KEY,
        status       text        NOT NULL DEFAULT 'running' CHECK (status IN ('running', 'done', 'failed')),
        rows_read    integer     NOT NULL DEFAULT 0,
        revokes      integer     NOT NULL DEFAULT 0,
        last_error   text,
        created_at   timestamptz NOT NULL DEFAULT now(),
        finished_at  timestamptz
    );
    """)


def downgrade() -> None:
    op.execute(r"""
    DROP TABLE deactivations;
    DROP INDEX grants_customer_action;
    ALTER TABLE grants DROP COLUMN action_id;
    """)
