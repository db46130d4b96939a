"""one partial index for claimed grants instead of two indexes maintained on every grant

`grants_run_status (run_id, status)` indexed every grant forever and `grants_claimed
(updated_at) WHERE status = 'claimed'` only the unfinished ones. Both readers (a run's
completion check and the sweeper) ask only for claimed grants, so one partial index on
`run_id` serves both; a grant leaves it when it is settled, and each INSERT and settle UPDATE
maintains one index less.

Revision ID: 0003
Revises: 0002
"""
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE INDEX grants_claimed_run ON grants (run_id) WHERE status = 'claimed';
    DROP INDEX grants_run_status;
    DROP INDEX grants_claimed;
    """)


def downgrade() -> None:
    op.execute("""
    CREATE INDEX grants_run_status ON grants (run_id, status);
    CREATE INDEX grants_claimed ON grants (updated_at) WHERE status = 'claimed';
    DROP INDEX grants_claimed_run;
    """)
