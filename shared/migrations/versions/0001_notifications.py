"""notifications inbox

Revision ID: 0001
Revises:
"""
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("""
    CREATE TABLE notifications (
        id            bigserial PRIMARY KEY,
        event_type    integer     NOT NULL,
        campaign_id   bigint,
        channel_id    bigint,
        dedupe_key    text        NOT NULL UNIQUE,
        payload       jsonb       NOT NULL,
        raw_body      text        NOT NULL,
        status        text        NOT NULL DEFAULT 'received'
                      CHECK (status IN ('received', 'processing', 'done', 'ignored', 'failed')),
        attempts      integer     NOT NULL DEFAULT 0,
        last_error    text,
        received_at   timestamptz NOT NULL DEFAULT now(),
        updated_at    timestamptz NOT NULL DEFAULT now(),
        processed_at  timestamptz
    );
    CREATE INDEX notifications_unfinished ON notifications (updated_at)
        WHERE status IN ('received', 'processing');
    CREATE INDEX notifications_campaign ON notifications (campaign_id);
    """)


def downgrade() -> None:
    op.execute("DROP TABLE notifications")
