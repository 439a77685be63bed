"""Entry point of a section's child process: `python -m bench.child SECTION SETTINGS RESULT`.

SETTINGS and RESULT are JSON file paths; the section's measurements are written to RESULT.
"""

from __future__ import annotations

import json
import os
import sys


def main(argv: list[str]) -> None:
    section, settings_path, result_path = argv
    # Before TensorFlow is imported by a section.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from bench.sections import SECTIONS

    with open(settings_path) as handle:
        settings = json.load(handle)
    result = SECTIONS[section](settings)
    with open(result_path, "w") as handle:
        json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main(sys.argv[1:])
