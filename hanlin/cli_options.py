"""The one way a command-line option is declared: every option can also come from HANLIN_<ENV>."""

from __future__ import annotations

from typing import Any

import typer


def env_option(*names: str, env: str, help: str, **kwargs: Any) -> Any:
    return typer.Option(*names, envvar=f"HANLIN_{env}", help=help, show_envvar=True, **kwargs)
