"""ledger rows keep their run id without a foreign key: the per-row check was a sixth of a claim

Every grant and send row of a run is claimed in the transaction that advances that run's cursor,
which holds the run row locked (`paging.claim_page`), and runs are never deleted, so the
reference always holds. The foreign key's per-row trigger (a lookup and a KEY SHARE lock of the
run for each of a page's 15,000 rows) cost 15-25 % of the claim rate (`bench/campaign.py`).

Revision ID: 0009
Revises: 0008
"""
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE grants DROP CONSTRAINT IF EXISTS grants_run_id_fkey;
    ALTER TABLE sends DROP CONSTRAINT IF EXISTS sends_run_id_fkey;
    """)


def downgrade() -> None:
    op.execute(r"""
    ALTER TABLE grants ADD CONSTRAINT grants_run_id_fkey FOREIGN KEY (run_id) REFERENCES campaign_runs(id);
    ALTER TABLE sends ADD CONSTRAINT sends_run_id_fkey FOREIGN KEY (run_id) REFERENCES campaign_runs(id);
    """)
