"""What the `raf portal` commands do, apart from the client (`client.py`); the demo, which also pretrains, is
composed one floor up (`rafmedia.launch.portal_commands`)."""
from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import uvicorn

from rafmedia.core.errors import UserError
from rafmedia.portal import accounts
from rafmedia.portal.app import create_app
from rafmedia.portal.challenges import add_challenge
from rafmedia.portal.db import open_database
from rafmedia.portal.settings import PortalRoot


def init_portal(root: str | Path, *, database_url: str = "") -> PortalRoot:
    """Creates (or upgrades) a portal root and its database."""
    portal = PortalRoot.create(root, database_url=database_url)
    open_database(portal.database_url)
    return portal


def publish_challenge(root: str | Path, build_dir: str | Path, *, slug: str, progress: bool = True,
                      **options: Any) -> str:
    portal = PortalRoot(root)
    sessions = open_database(portal.database_url)
    with sessions.begin() as db:
        challenge = add_challenge(portal, db, build_dir, slug=slug, progress=progress, **options)
        return challenge.slug


def manage_user(root: str | Path, action: str, name: str, *, role: str = "participant", team: str = "",
                password: str = "") -> str:
    """add (prints a generated password unless one is given) | token (a new API token) | disable | enable |
    revoke (every token). Returns what to print."""
    portal = PortalRoot(root)
    sessions = open_database(portal.database_url)
    with sessions.begin() as db:
        if action == "add":
            generated = not password
            password = password or secrets.token_urlsafe(12)
            accounts.add_user(db, name, password, role=role, team=team)
            return f"user {name} ({role}) added" + (f"; password: {password}" if generated else "")
        user = accounts.find_user(db, name)
        if action == "token":
            return accounts.new_token(db, user, label="cli")
        if action in ("disable", "enable"):
            accounts.set_disabled(db, user, action == "disable")
            return f"user {name} {action}d" + ("; signed out and tokens revoked" if action == "disable" else "")
        if action == "revoke":
            return f"{accounts.revoke_tokens(db, user)} token(s) of {name} revoked"
    raise UserError(f"unknown user action '{action}'")


def serve(root: str | Path, *, host: str = "127.0.0.1", port: int = 8000, log_level: str = "warning") -> None:
    """Runs the web app with uvicorn until stopped."""
    app = create_app(root)
    print(f"portal: http://{host}:{port}/ (root {PortalRoot(root).path}); Ctrl-C stops it", flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, proxy_headers=False)
