"""HTTP server for lookup, influence and forget requests over one gradstore and one model.

    from gradstore_server import Settings, create_app
    app = create_app(Settings.from_env(store="runs/store", model="runs/model"))

or `gradstore serve --store URI --model DIR` / `python -m gradstore_server --store URI --model DIR`.
"""

from typing import Any

from .settings import Settings, SettingsError

__all__ = ["Settings", "SettingsError", "create_app"]


def __getattr__(name: str) -> Any:
    # `create_app` pulls in torch, transformers and FastAPI: imported on first use, so that registering the
    # `serve` command (and `gradstore --help`) stays fast.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
