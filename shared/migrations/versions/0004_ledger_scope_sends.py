"""ledger scope and stored idempotency keys; the sends ledger; sent counts on runs

Grants get `scope` (0: the campaign; otherwise the notification a real-time grant is unique
to) in their unique key, the `notification_id` that caused a real-time grant, and the
idempotency key stored when the row is claimed. Existing rows get the key the code computed
for them until now: `relay-` + 40 hex characters of sha256(campaign, customer, code joined by
U+001F), so a grant claimed before the upgrade is re-sent with the same key.

`sends` is the ledger of the send service (flows 1 and 2), built the same way.

Revision ID: 0004
Revises: 0003
"""
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(r"""
    ALTER TABLE grants
        ADD COLUMN scope bigint NOT NULL DEFAULT 0,
        ADD COLUMN notification_id bigint,
        ADD COLUMN idempotency_key text;
    UPDATE grants SET idempotency_key = 'relay-' || left(encode(sha256(convert_to(
        campaign_id::text || chr(31) || customer_id || chr(31) || promo_code, 'UTF8')), 'hex'), 40);
    ALTER TABLE grants
        ALTER COLUMN idempotency_key SET NOT NULL,
        DROP CONSTRAINT grants_once_per_campaign,
        ADD CONSTRAINT grants_once_per_scope UNIQUE (campaign_id, customer_id, promo_code, scope);

    ALTER TABLE campaign_runs ADD COLUMN sent integer NOT NULL DEFAULT 0;

    CREATE TABLE sends (
        id               bigserial PRIMARY KEY,
        campaign_id      bigint      NOT NULL,
        channel_id       bigint      NOT NULL,
        customer_id      text        NOT NULL,
        template_id      bigint      NOT NULL,
        scope            bigint      NOT NULL DEFAULT 0,
        notification_id  bigint,
        run_id           bigint      REFERENCES campaign_runs(id),
        source           text        NOT NULL,
        attributes       jsonb       NOT NULL DEFAULT '{}',
        promo_codes      jsonb       NOT NULL DEFAULT '[]',
        scheduled_time   timestamptz,
        idempotency_key  text        NOT NULL,
        status           text        NOT NULL DEFAULT 'claimed'
                         CHECK (status IN ('claimed', 'sent', 'rejected', 'failed')),
        attempts         integer     NOT NULL DEFAULT 0,
        reference        text,
        reason           text,
        created_at       timestamptz NOT NULL DEFAULT now(),
        updated_at       timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT sends_once_per_scope UNIQUE (campaign_id, channel_id, customer_id, template_id, scope)
    );
    CREATE INDEX sends_claimed_run ON sends (run_id) WHERE status = 'claimed';
    """)


def downgrade() -> None:
    op.execute("""
    DROP TABLE sends;
    ALTER TABLE campaign_runs DROP COLUMN sent;
    DELETE FROM grants WHERE scope <> 0;
    ALTER TABLE grants
        DROP CONSTRAINT grants_once_per_scope,
        ADD CONSTRAINT grants_once_per_campaign UNIQUE (campaign_id, customer_id, promo_code),
        DROP COLUMN idempotency_key, DROP COLUMN notification_id, DROP COLUMN scope;
    """)
