"""sandboxed code, leakage guards, resumable uploads, cluster jobs; download sizes as 64-bit integers

Columns added to tables that may hold rows get a server default, so a portal made by rafmedia 0001 upgrades in place.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06 18:37:14.824643
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('uploads',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('public_id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.Integer(), nullable=False),
    sa.Column('filename', sa.String(length=128), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('received', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.Float(), nullable=False),
    sa.Column('updated_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('public_id')
    )
    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_uploads_user_id'), ['user_id'], unique=False)

    with op.batch_alter_table('downloads', schema=None) as batch_op:
        batch_op.alter_column('bytes',
               existing_type=sa.INTEGER(),
               type_=sa.BigInteger(),
               existing_nullable=False)

    with op.batch_alter_table('phases', schema=None) as batch_op:
        batch_op.add_column(sa.Column('team_daily_limit', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('ladder', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('ladder_step', sa.Float(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('private_leaderboard', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('revealed_at', sa.Float(), nullable=True))

    with op.batch_alter_table('submissions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('runs_code', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('released_json', sa.Text(), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('external_job', sa.String(length=64), nullable=False, server_default=''))



def downgrade() -> None:
    with op.batch_alter_table('submissions', schema=None) as batch_op:
        batch_op.drop_column('external_job')
        batch_op.drop_column('released_json')
        batch_op.drop_column('runs_code')

    with op.batch_alter_table('phases', schema=None) as batch_op:
        batch_op.drop_column('revealed_at')
        batch_op.drop_column('private_leaderboard')
        batch_op.drop_column('ladder_step')
        batch_op.drop_column('ladder')
        batch_op.drop_column('team_daily_limit')

    with op.batch_alter_table('downloads', schema=None) as batch_op:
        batch_op.alter_column('bytes',
               existing_type=sa.BigInteger(),
               type_=sa.INTEGER(),
               existing_nullable=False)

    with op.batch_alter_table('uploads', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_uploads_user_id'))

    op.drop_table('uploads')
