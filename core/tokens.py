"""API tokens: created and revoked from the CLI, stored hashed, checked by the API on every request."""

from __future__ import annotations

import hashlib
import secrets
import uuid
from dataclasses import dataclass

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.models import ApiToken, utcnow

__all__ = ["Principal", "create_token", "hash_token", "list_tokens", "revoke_token", "verify_token"]

PREFIX = "tsk_"


@dataclass(frozen=True)
class Principal:
    """Who is calling: an owner name, and whether they may see every owner's jobs."""

    owner: str
    admin: bool = False

    @property
    def scope(self) -> str | None:
        """The owner filter for queries: None (everything) for admins."""
        return None if self.admin else self.owner


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(session: Session, owner: str, name: str = "default", admin: bool = False) -> tuple[ApiToken, str]:
    """Create a token; the plain value is returned once and never stored."""
    plain = PREFIX + secrets.token_urlsafe(32)
    row = ApiToken(id=uuid.uuid4(), name=name, owner=owner, token_hash=hash_token(plain), is_admin=admin)
    session.add(row)
    session.flush()
    return row, plain


def verify_token(session: Session, plain: str) -> Principal | None:
    """The principal for a presented token, or None if unknown or revoked."""
    if not plain or not plain.startswith(PREFIX) or len(plain) > 200:
        return None
    row = session.scalar(select(ApiToken).where(ApiToken.token_hash == hash_token(plain),
                                                ApiToken.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(owner=row.owner, admin=row.is_admin)


def revoke_token(session: Session, token_id: uuid.UUID) -> bool:
    res = session.execute(update(ApiToken).where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
                          .values(revoked_at=utcnow()))
    return res.rowcount == 1


def list_tokens(session: Session) -> list[ApiToken]:
    return list(session.scalars(select(ApiToken).order_by(ApiToken.created_at)).all())
