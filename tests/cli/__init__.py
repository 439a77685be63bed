"""Tests of leukoflow/cli, one module per command module; helpers shared by them."""

import os
import subprocess
import sys


def leukoflow(*args, env=None, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """The command line as a user meets it: a separate process (stdout and stderr are pipes)."""
    return subprocess.run(
        [sys.executable, "-m", "leukoflow.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def assert_user_error(result, *words) -> None:
    """A LeukoflowError: exit 2 and one `leukoflow: error` line naming `words`, no traceback."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if "leukoflow: error" in line]
    assert len(lines) == 1, result.stderr
    for word in words:
        assert word in lines[0]


def assert_click_usage(result, *words) -> None:
    """Bad usage: click's usage message (Usage, Try --help, Error) and exit 2."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("Usage: leukoflow"), result.stderr
    assert "--help' for help" in result.stderr and "Traceback" not in result.stderr
    assert "run failed" not in result.stderr
    error = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(error) == 1, result.stderr
    for word in words:
        assert word in error[0]


def leukoflow_here(capsys, *args) -> subprocess.CompletedProcess:
    """The same entry point in this process: the exit status and output, without the import
    time of a new interpreter (the subprocess tests prove the process-level behaviour)."""
    from leukoflow.cli import main

    capsys.readouterr()
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as done:
        code = done.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, captured.out, captured.err)
