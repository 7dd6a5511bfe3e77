"""API keys, read where they are used: from a file or an environment variable a spec names, never from
the spec itself (a spec is recorded with the run, and a submitted job's is shown to anyone who can list
jobs).

    key = read_api_key(http.api_key_file, http.api_key_env, "http.api_key_file")
"""

from __future__ import annotations

import os
from pathlib import Path


class ApiKeyError(ValueError):
    """The key file cannot be read or is empty; the message names the field and the file."""


def read_api_key(file: str | None, env: str, field: str) -> str | None:
    """The key in `file` (the spec's `field`), else in the environment variable `env`; None where
    neither holds one."""
    if file:
        try:
            key = Path(file).expanduser().read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as err:
            raise ApiKeyError(f"{field} {file}: cannot read it ({err})") from None
        if not key:
            raise ApiKeyError(f"{field} {file} is empty")
        return key
    return os.environ.get(env, "").strip() or None
