"""campaign runs and the grant ledger

Revision ID: 0002
Revises: 0001
"""
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE campaign_runs (
        id                  bigserial PRIMARY KEY,
        notification_id     bigint      NOT NULL REFERENCES notifications(id),
        flow                text        NOT NULL,
        campaign_id         bigint      NOT NULL,
        channel_id          bigint,
        status              text        NOT NULL DEFAULT 'running'
                            CHECK (status IN ('running', 'done', 'failed', 'cancelled')),
        cursor              integer     NOT NULL DEFAULT 0,
        fetch_done          boolean     NOT NULL DEFAULT false,
        pages_fetched       integer     NOT NULL DEFAULT 0,
        fetched             integer     NOT NULL DEFAULT 0,
        claimed             integer     NOT NULL DEFAULT 0,
        duplicates_skipped  integer     NOT NULL DEFAULT 0,
        granted             integer     NOT NULL DEFAULT 0,
        rejected            integer     NOT NULL DEFAULT 0,
        failed              integer     NOT NULL DEFAULT 0,
        attempts            integer     NOT NULL DEFAULT 0,
        last_error          text,
        created_at          timestamptz NOT NULL DEFAULT now(),
        updated_at          timestamptz NOT NULL DEFAULT now(),
        finished_at         timestamptz,
        UNIQUE (notification_id, flow)
    );
    CREATE INDEX campaign_runs_campaign ON campaign_runs (campaign_id);
    CREATE INDEX campaign_runs_unfinished ON campaign_runs (updated_at) WHERE status = 'running';

    CREATE TABLE grants (
        id               bigserial PRIMARY KEY,
        campaign_id      bigint      NOT NULL,
        customer_id      text        NOT NULL,
        promo_code       text        NOT NULL,
        channel_id       bigint,
        run_id           bigint      REFERENCES campaign_runs(id),
        source           text        NOT NULL,
        status           text        NOT NULL DEFAULT 'claimed'
                         CHECK (status IN ('claimed', 'granted', 'rejected', 'failed')),
        attempts         integer     NOT NULL DEFAULT 0,
        reference        text,
        reason           text,
        created_at       timestamptz NOT NULL DEFAULT now(),
        updated_at       timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT grants_once_per_campaign UNIQUE (campaign_id, customer_id, promo_code)
    );
    CREATE INDEX grants_run_status ON grants (run_id, status);
    CREATE INDEX grants_claimed ON grants (updated_at) WHERE status = 'claimed';
    """)


def downgrade() -> None:
    op.execute("DROP TABLE grants; DROP TABLE campaign_runs")
