"""Alembic revisions (a package, so an installed wheel carries them)."""
