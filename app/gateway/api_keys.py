"""API keys: who a caller is, which tiers it may use, and its default tier.

A key is ``crl_`` plus 32 random bytes (URL-safe base64). Only its SHA-256 is stored: the key
is random, so a fast hash is enough to make a stolen database useless, and lookups stay one
indexed query. The first characters (the prefix) are kept in clear to tell keys apart in
listings and logs.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import DateTime, String, false, or_, select
from sqlalchemy.orm import Mapped, mapped_column

from app.db import Base, sessions
from app.settings import TIERS, Tier, get_settings

KEY_PREFIX = "crl_"
#: Characters of the key kept in clear: "crl_" plus 8 of the random part.
SHOWN = len(KEY_PREFIX) + 8


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(primary_key=True)
    prefix: Mapped[str] = mapped_column(String(16), unique=True, index=True)
    key_hash: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    agent: Mapped[str] = mapped_column(String(128))
    agent_class: Mapped[str] = mapped_column(String(64))
    tiers: Mapped[str] = mapped_column(String(64), doc="comma-separated, e.g. interactive,normal")
    default_tier: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), default=None)
    admin: Mapped[bool] = mapped_column(default=False, server_default=false())


@dataclass(frozen=True)
class KeyInfo:
    """What the gateway knows about a caller once its key checked out."""

    id: int
    prefix: str
    agent: str
    agent_class: str
    tiers: tuple[Tier, ...]
    default_tier: Tier
    created_at: datetime
    revoked_at: datetime | None
    #: May use the admin API (``/admin/...``): change the fleet.
    admin: bool = False

    @classmethod
    def of(cls, row: ApiKey) -> KeyInfo:
        return cls(
            id=row.id,
            prefix=row.prefix,
            agent=row.agent,
            agent_class=row.agent_class,
            tiers=tuple(row.tiers.split(",")),  # type: ignore[arg-type]
            default_tier=row.default_tier,  # type: ignore[arg-type]
            created_at=_utc(row.created_at),
            revoked_at=row.revoked_at and _utc(row.revoked_at),
            admin=row.admin,
        )


def _utc(moment: datetime) -> datetime:
    # SQLite stores no time zone: its datetimes come back naive, but were written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_tiers(tiers: str | list[str]) -> tuple[Tier, ...]:
    """``"interactive,normal"`` as tiers, in TIERS order; ValueError names the bad ones."""
    names = [t.strip() for t in (tiers.split(",") if isinstance(tiers, str) else tiers)]
    unknown = [t for t in names if t and t not in TIERS]
    if unknown or not any(names):
        raise ValueError(f"tiers must be a comma-separated subset of {', '.join(TIERS)}")
    return tuple(t for t in TIERS if t in names)


class KeyStore:
    """Keys in the database at ``url``; every method is one short transaction."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or get_settings().database_url
        self._sessions = sessions(self.url)

    @classmethod
    def ready(cls, url: str | None = None) -> KeyStore:
        """A store whose database schema is up to date (migrated if needed)."""
        store = cls(url)
        store.migrate()
        return store

    def migrate(self) -> None:
        from app.migrations import upgrade

        upgrade(self.url)

    def add(
        self,
        agent: str,
        agent_class: str,
        tiers: str | list[str],
        default_tier: str | None = None,
        *,
        admin: bool = False,
    ) -> tuple[str, KeyInfo]:
        """Create a key; returns it (shown once, never stored) and its record."""
        allowed = parse_tiers(tiers)
        if default_tier is None:
            configured = get_settings().default_tier
            # The configured default if the key may use it, else its least urgent tier.
            default_tier = configured if configured in allowed else allowed[-1]
        if default_tier not in allowed:
            raise ValueError(f"default tier {default_tier!r} is not one of {', '.join(allowed)}")
        if not agent.strip() or len(agent) > 128:
            raise ValueError("agent must be 1-128 characters")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        row = ApiKey(
            prefix=key[:SHOWN],
            key_hash=digest(key),
            agent=agent,
            agent_class=agent_class,
            tiers=",".join(allowed),
            default_tier=default_tier,
            created_at=datetime.now(UTC),
            admin=admin,
        )
        with self._sessions.begin() as session:
            session.add(row)
            session.flush()
            return key, KeyInfo.of(row)

    def lookup(self, key: str) -> KeyInfo | None:
        """The live (not revoked) key's record, or None."""
        if not key.startswith(KEY_PREFIX):
            return None
        with self._sessions() as session:
            row = session.scalar(
                select(ApiKey).where(ApiKey.key_hash == digest(key), ApiKey.revoked_at.is_(None))
            )
            return KeyInfo.of(row) if row else None

    def all(self, include_revoked: bool = False) -> list[KeyInfo]:
        query = select(ApiKey).order_by(ApiKey.id)
        if not include_revoked:
            query = query.where(ApiKey.revoked_at.is_(None))
        with self._sessions() as session:
            return [KeyInfo.of(row) for row in session.scalars(query)]

    def revoke(self, ref: str) -> KeyInfo | None:
        """Revoke the key whose id, prefix or full text is ``ref``; None if no live key matches."""
        match = [ApiKey.prefix == ref[:SHOWN], ApiKey.key_hash == digest(ref)]
        if ref.isdigit():
            match.append(ApiKey.id == int(ref))
        with self._sessions.begin() as session:
            row = session.scalar(select(ApiKey).where(or_(*match), ApiKey.revoked_at.is_(None)))
            if row is None:
                return None
            row.revoked_at = datetime.now(UTC)
            return KeyInfo.of(row)
