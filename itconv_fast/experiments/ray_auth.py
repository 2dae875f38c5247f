"""Ray's token authentication for a sweep's driver: a cluster started with `ray start --head` asks every client
for its token (by default in Ray 2.60, the version `make setup` installs); `itconv-fast sweep --address ...
--auth-token-file FILE` passes it."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Optional

__all__ = ["check_auth_token_file", "ray_auth"]


def check_auth_token_file(path: str) -> None:
    """Raises ValueError naming the file when it cannot be read or holds no token."""
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: the Ray auth token file cannot be read ({exc})") from None
    if not token or any(c.isspace() for c in token):
        raise ValueError(f"{path}: not a Ray auth token (one word, as `ray get-auth-token` prints)")


@contextlib.contextmanager
def ray_auth(auth_token_file: Optional[str]):
    """Ray's token authentication for this driver: RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (what Ray's
    clients read), put back as they were afterwards."""
    if auth_token_file is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_TOKEN")}
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.abspath(auth_token_file))
    os.environ.pop("RAY_AUTH_TOKEN", None)  # the file is what was asked for
    _refresh_ray_auth()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    """Ray reads the authentication mode and token when it is imported and caches both (its C++ config and token
    loader); a driver that imported Ray before (the CLI checks that Ray Tune is installed) must have them read
    again, as Ray's own `ray start` does when it turns token authentication on."""
    if "ray._raylet" not in sys.modules:
        return  # read at import, from the environment just set
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
