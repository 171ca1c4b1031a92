"""The two kinds of error a program reports as one `error:` line, without a traceback.

* `UserError`: the input is wrong (a flag, a config field, a file, a workdir, a missing asset).
  The message names the field, file and line, or flag, and the fix. Exit code 2.
* `FailureError`: the input was fine but the work could not be done (a non-finite loss, a checkpoint
  that cannot be read or written). The message says what is kept and how to go on. Exit 1.

Anything else is a bug: the programs show its traceback (`smatch_jax/main/cli.py`). Library
errors subclass one of these and a builtin (`ConfigError(UserError, ValueError)`), so code that
catches `ValueError` keeps working.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input; the message names what to change."""

    exit_code = 2


class FailureError(Exception):
    """Good input, work that could not be done; the message says what is kept."""

    exit_code = 1
