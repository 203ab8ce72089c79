"""Accounts: users with roles, argon2 password hashes, browser sessions with a CSRF token each, and revocable API
tokens for the client. Secrets are stored only as hashes: a stolen database gives neither passwords nor tokens."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import select
from sqlalchemy.orm import Session

from rafmedia.core.errors import UserError
from rafmedia.core.registry import unknown_name_error
from rafmedia.portal.db import ROLES, ApiToken, User, WebSession

HASHER = PasswordHasher()
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,63}$")
MIN_PASSWORD = 8
_DUMMY_HASH = HASHER.hash("not a password of anyone")  # verified against on unknown names: equal timing


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise UserError(f"the password must have at least {MIN_PASSWORD} characters")


def set_password(user: User, password: str) -> None:
    check_password(password)
    user.password_hash = HASHER.hash(password)


def add_user(db: Session, name: str, password: str, *, role: str = "participant", team: str = "") -> User:
    if not NAME.match(name):
        raise UserError(f"user name '{name}' must be 2-64 letters, digits, '.', '_' or '-', starting with a letter "
                        "or digit")
    if role not in ROLES:
        raise unknown_name_error("role", role, ROLES)
    check_password(password)
    if db.scalar(select(User).where(User.name == name)) is not None:
        raise UserError(f"user '{name}' exists already")
    user = User(name=name, password_hash=HASHER.hash(password), role=role, team=team[:64])
    db.add(user)
    db.flush()
    return user


def find_user(db: Session, name: str) -> User:
    user = db.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserError(f"no user '{name}' (add one with `raf portal user ROOT add {name}`)")
    return user


def authenticate(db: Session, name: str, password: str) -> User | None:
    """The user whose name and password these are, enabled; None otherwise (the same work either way)."""
    user = db.scalar(select(User).where(User.name == name))
    try:
        HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    return user if user is not None and not user.disabled else None


def set_disabled(db: Session, user: User, disabled: bool = True) -> None:
    """Disabling signs the user out everywhere and revokes every token."""
    user.disabled = disabled
    if disabled:
        for session in db.scalars(select(WebSession).where(WebSession.user_id == user.id)):
            db.delete(session)
        for token in db.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))):
            token.revoked_at = time.time()


def new_token(db: Session, user: User, label: str = "") -> str:
    """A new API token for `user`; the only time its text exists in full."""
    prefix, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
    db.add(ApiToken(user_id=user.id, prefix=prefix, secret_hash=sha256(secret), label=label[:64]))
    db.flush()
    return f"raf_{prefix}_{secret}"


def revoke_tokens(db: Session, user: User) -> int:
    tokens = list(db.scalars(select(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))))
    for token in tokens:
        token.revoked_at = time.time()
    return len(tokens)


def token_user(db: Session, text: str) -> User | None:
    """The enabled user of a valid, unrevoked token; None for anything else."""
    parts = text.split("_", 2)
    if len(parts) != 3 or parts[0] != "raf":
        return None
    token = db.scalar(select(ApiToken).where(ApiToken.prefix == parts[1], ApiToken.revoked_at.is_(None)))
    if token is None or not hmac.compare_digest(token.secret_hash, sha256(parts[2])):
        return None
    return token.user if not token.user.disabled else None


def start_session(db: Session, user: User, *, hours: float) -> tuple[str, str]:
    """A new browser session: (cookie token, CSRF token)."""
    token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(24)
    db.add(WebSession(token_hash=sha256(token), user_id=user.id, csrf_token=csrf,
                      expires_at=time.time() + hours * 3600))
    db.flush()
    return token, csrf


def session_of(db: Session, token: str) -> WebSession | None:
    session = db.get(WebSession, sha256(token)) if token else None
    if session is None or session.expires_at < time.time() or session.user.disabled:
        return None
    return session


def end_session(db: Session, token: str) -> None:
    session = db.get(WebSession, sha256(token)) if token else None
    if session is not None:
        db.delete(session)
