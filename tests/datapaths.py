"""Where the tests find the real C-NMC cells: one place for every test.

The shared data lies in `shared/data` beside the clone (CI clones anywhere and copies `shared/`
beside it); LEUKOFLOW_SHARED_DATA names another folder. The cells are read in place, never copied
into the repository.
"""

from __future__ import annotations

import os
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(
    os.environ.get("LEUKOFLOW_SHARED_DATA") or REPOSITORY.parent / "shared" / "data"
).resolve()
CNMC = SHARED_DATA / "cnmc"  # 103 real cells (original BMPs), 39 subjects
CNMC_POOL = SHARED_DATA / "cnmc-pool"  # 1,468 more (lossless PNGs), 34 subjects
