"""Subject pseudonyms: keyed by the store's salt, stable, and one salt even when two processes
use a new store at the same moment."""

from __future__ import annotations

import hashlib
import hmac
import multiprocessing
import re

import pytest

from leukoflow.errors import LeukoflowError
from leukoflow.store.pseudonym import (
    SALT_PATH,
    pseudonymise_subjects,
    subject_key,
    subject_salt,
)
from leukoflow.store.storage import open_location


def test_keys_are_keyed_by_the_salt_and_stable(tmp_path) -> None:
    store = open_location(str(tmp_path / "store"))
    salt = subject_salt(store)
    assert len(salt) == 32 and subject_salt(store) == salt  # made once, then read back
    key = subject_key("MRN-0048213-77", salt)
    assert re.fullmatch(r"S-[0-9a-f]{12}", key)
    expected = hmac.new(salt, b"MRN-0048213-77", hashlib.sha256).hexdigest()[:12]
    assert key == f"S-{expected}"
    assert subject_key("MRN-0048213-77", subject_salt(store)) == key
    # Without the salt, the plain hash of the id does not give the key.
    assert key != "S-" + hashlib.sha256(b"MRN-0048213-77").hexdigest()[:12]
    other = subject_salt(open_location(str(tmp_path / "other")))
    assert subject_key("MRN-0048213-77", other) != key
    assert subject_key(None, salt) is None and subject_key("", salt) is None


def test_pseudonymise_subjects_replaces_only_the_subject(tmp_path) -> None:
    salt = subject_salt(open_location(str(tmp_path)))
    rows = [{"subject_id": "MRN-1", "n": 3}, {"subject_id": None, "n": 1}]
    shown = pseudonymise_subjects(rows, salt)
    assert shown == [
        {"subject_id": subject_key("MRN-1", salt), "n": 3},
        {"subject_id": None, "n": 1},
    ]
    assert rows[0]["subject_id"] == "MRN-1"  # the input is left alone


def test_a_damaged_salt_is_refused_not_replaced(tmp_path) -> None:
    store = open_location(str(tmp_path))
    path = tmp_path.joinpath(*SALT_PATH)
    path.parent.mkdir(parents=True)
    path.write_text("not hex")
    with pytest.raises(LeukoflowError, match="subject salt .* is damaged"):
        subject_salt(store)
    assert path.read_text() == "not hex"


def _first_use(store_path: str, barrier, results) -> None:
    barrier.wait()
    results.put(subject_key("MRN-0048213-77", subject_salt(open_location(store_path))))


def test_two_first_uses_at_once_get_one_key(tmp_path) -> None:
    context = multiprocessing.get_context("fork")
    for round_ in range(4):  # several fresh stores: a lost race shows up in some round
        store = tmp_path / f"store-{round_}"
        n = 6
        barrier, results = context.Barrier(n), context.Queue()
        processes = [
            context.Process(target=_first_use, args=(str(store), barrier, results))
            for _ in range(n)
        ]
        for process in processes:
            process.start()
        keys = {results.get(timeout=60) for _ in processes}
        for process in processes:
            process.join(timeout=60)
        assert len(keys) == 1
        salt = subject_salt(open_location(str(store)))
        assert keys == {subject_key("MRN-0048213-77", salt)}
        assert not [p for p in store.joinpath(SALT_PATH[0]).iterdir() if p.name.startswith(".")]
