"""Pseudonymous subject keys for what leaves the store: Prefect artifacts and logs.

Subject ids can carry patient identifiers (a manifest may hold medical record numbers). The
store keeps them, in its tables; anything published outside it shows `subject_key(id)` instead:
"S-" and the first 12 hex digits of HMAC-SHA256(salt, id). The salt is 32 random bytes kept in
the store at keys/subject-salt, made on first use, so a subject keeps one key night after night.
The salt is created with the storage layer's create-if-absent, so of two first uses at once (two
sweeps, a sweep and a dashboard) exactly one writes it, and both then read back the one that won.
Whoever can read the store can map a key back (compute the keys of the subject ids in its
tables); without the salt nobody can, not even by trying every plausible id.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from leukoflow.errors import LeukoflowError
from leukoflow.store.storage import Location, create_if_absent, exists

SALT_PATH = ("keys", "subject-salt")


def subject_salt(store: Location) -> bytes:
    """The store's salt for subject keys, created on first use."""
    loc = store.child(*SALT_PATH)
    if not exists(loc):
        # Losing the race is fine: the salt the winner wrote is read back below.
        create_if_absent(loc, secrets.token_hex(32).encode("ascii"))
    text = loc.fs.cat_file(loc.path).decode("ascii", "replace").strip()
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = b""
    if len(salt) != 32:
        # Never make a new one over it: every pseudonym published so far would change meaning.
        raise LeukoflowError(f"the subject salt {loc.uri} is damaged (not 64 hex digits)")
    return salt


def subject_key(subject_id: str | None, salt: bytes) -> str | None:
    """The pseudonym of a subject id (None stays None: no subject, nothing to hide)."""
    if subject_id is None or subject_id == "":
        return None
    digest = hmac.new(salt, subject_id.encode("utf-8"), hashlib.sha256).hexdigest()
    return f"S-{digest[:12]}"


def pseudonymise_subjects(rows: list[dict], salt: bytes, field: str = "subject_id") -> list[dict]:
    """Copies of `rows` whose subject id is replaced by its key."""
    return [{**row, field: subject_key(row.get(field), salt)} for row in rows]
