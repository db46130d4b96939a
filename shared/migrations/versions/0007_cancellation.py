"""cancellation (EventTypeID 4): cancelled grants and sends, revokes, the campaigns' cancellation lists

Pending work of a cancelled campaign becomes `cancelled` (never delivered). Grants already made to
customers on the cancellation list are revoked through the `revokes` ledger (one row per grant,
so a grant is revoked at most once); the grant itself then reads `revoked`, or
`revoke_unsupported` when the bonus adapter cannot revoke.

Revision ID: 0007
Revises: 0006
"""
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE grants DROP CONSTRAINT grants_status_check;
    ALTER TABLE grants ADD CONSTRAINT grants_status_check
        CHECK (status IN ('claimed', 'granted', 'rejected', 'failed', 'expired', 'cancelled', 'revoked',
                          'revoke_unsupported'));
    ALTER TABLE sends DROP CONSTRAINT sends_status_check;
    ALTER TABLE sends ADD CONSTRAINT sends_status_check
        CHECK (status IN ('waiting', 'claimed', 'sent', 'rejected', 'failed', 'cancelled'));
    ALTER TABLE campaign_runs
        ADD COLUMN revoked integer NOT NULL DEFAULT 0,
        ADD COLUMN cancelled integer NOT NULL DEFAULT 0;

    CREATE TABLE cancelled_customers (
        campaign_id  bigint      NOT NULL,
        customer_id  text        NOT NULL,
        created_at   timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (campaign_id, customer_id)
    );

    CREATE TABLE revokes (
        id               bigserial PRIMARY KEY,
        campaign_id      bigint      NOT NULL,
        channel_id       bigint,
        customer_id      text        NOT NULL,
        promo_code       text        NOT NULL,
        grant_id         bigint      NOT NULL REFERENCES grants(id),
        grant_reference  text,
        run_id           bigint      REFERENCES campaign_runs(id),
        notification_id  bigint,
        scope            bigint      NOT NULL DEFAULT 0,
        source           text        NOT NULL,
        idempotency_key  text        NOT NULL,
        status           text        NOT NULL DEFAULT 'claimed'
                         CHECK (status IN ('claimed', 'revoked', 'rejected', 'failed')),
        attempts         integer     NOT NULL DEFAULT 0,
        reference        text,
        reason           text,
        created_at       timestamptz NOT NULL DEFAULT now(),
        updated_at       timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT revokes_once_per_grant UNIQUE (grant_id)
    );
    CREATE INDEX revokes_claimed_run ON revokes (run_id) WHERE status = 'claimed';
    CREATE INDEX revokes_claimed ON revokes (updated_at) WHERE status = 'claimed';
    CREATE INDEX revokes_campaign ON revokes (campaign_id, status);
    """)


def downgrade() -> None:
    op.execute(r"""
    DROP TABLE revokes;
    DROP TABLE cancelled_customers;
    ALTER TABLE campaign_runs DROP COLUMN revoked, DROP COLUMN cancelled;
    UPDATE sends SET status = 'failed' WHERE status = 'cancelled';
    ALTER TABLE sends DROP CONSTRAINT sends_status_check;
    ALTER TABLE sends ADD CONSTRAINT sends_status_check
        CHECK (status IN ('waiting', 'claimed', 'sent', 'rejected', 'failed'));
    UPDATE grants SET status = 'failed' WHERE status = 'cancelled';
    UPDATE grants SET status = 'granted' WHERE status IN ('revoked', 'revoke_unsupported');
    ALTER TABLE grants DROP CONSTRAINT grants_status_check;
    ALTER TABLE grants ADD CONSTRAINT grants_status_check
        CHECK (status IN ('claimed', 'granted', 'rejected', 'failed', 'expired'));
    """)
