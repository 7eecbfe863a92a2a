"""The `serve` command: `gradstore serve` (registered by `add_serve_command`) and `python -m gradstore_server`.

One uvicorn process, one worker: the process owns the model, and several workers would each hold (and
publish) their own weights. The address is bound first (an unusable one changes nothing), then the store and
the model are opened (and interrupted forgets and jobs settled) before the socket listens, so that a bad store
or model fails at once with one line on stderr. With `--port
0` the operating system picks a free port; the bound address is printed on stdout (`gradstore-server listening
on http://HOST:PORT`) once startup is done; poll `/healthz` for readiness. Exit codes: 0 after a clean
shutdown, 2 for bad settings (including GRADSTORE_FORGET_CONFIG) or an unusable address, 3 if the store or
the model could not be opened (or another server, or a `gradstore forget`, holds the model).
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Sequence
from typing import Any

from .settings import LOG_LEVELS, Settings, SettingsError

log = logging.getLogger("gradstore_server")


def _storage_options(items: list[str] | None) -> dict[str, Any] | None:
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SettingsError(f"--storage-option expects KEY=VALUE, got {item!r}")
        options[key] = value
    return options or None


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the serve options to `parser` (settings not given fall back to GRADSTORE_* variables)."""
    parser.add_argument("--store", help="store URI: a local path or s3://bucket/prefix (env GRADSTORE_STORE)")
    parser.add_argument("--model", help="model directory, as written by save_model (env GRADSTORE_MODEL)")
    parser.add_argument("--host", help="address to listen on (env GRADSTORE_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port; 0 picks a free one (env GRADSTORE_PORT; default 8000)")
    parser.add_argument("--device", help="torch device of the model (env GRADSTORE_DEVICE; default cpu)")
    parser.add_argument("--api-key", action="append", metavar="KEY",
                        help="an accepted API key; repeatable. Prefer GRADSTORE_API_KEYS (comma-separated): "
                             "arguments are visible to other users in the process list")
    parser.add_argument("--storage-option", action="append", metavar="KEY=VALUE",
                        help="option for an s3:// store (endpoint_url=..., key=..., secret=...); repeatable")
    parser.add_argument("--log-level", choices=LOG_LEVELS,
                        help="log level (env GRADSTORE_LOG_LEVEL; default info)")
    parser.add_argument("--access-log", action="store_const", const=True,
                        help="log every request line (env GRADSTORE_ACCESS_LOG; off by default: URLs name IDs)")
    parser.set_defaults(func=serve)
    # The settings without an option: shown in --help, since nothing else on the command line names them.
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = ("environment only:\n"
                     "  GRADSTORE_FORGET_CONFIG     JSON object of ForgetConfig fields (default: the library's)\n"
                     "  GRADSTORE_DEFAULT_MODE      forget mode when a request names none (default first_epoch)\n"
                     "  GRADSTORE_MAX_BODY_BYTES    larger request bodies get 413 (default 1048576)\n"
                     "  GRADSTORE_MAX_QUEUED_JOBS   forget jobs waiting beyond this get 503 (default 100)\n"
                     "  GRADSTORE_JOB_MAX_ATTEMPTS  runs of a job a crash may interrupt before it is rolled back "
                     "(default 3)")
    return parser


def add_serve_command(subparsers: Any) -> argparse.ArgumentParser:
    """Register `serve` on the `gradstore` command line's subparsers (it sets `func` to `serve`)."""
    parser = subparsers.add_parser("serve", help="run the HTTP server",
                                   description="Serve lookups, influence queries and forget requests over HTTP.")
    return configure_parser(parser)


def settings_from_args(args: argparse.Namespace) -> Settings:
    return Settings.from_env(store=args.store, model=args.model, host=args.host, port=args.port,
                             device=args.device, api_keys=args.api_key,
                             storage_options=_storage_options(args.storage_option), log_level=args.log_level,
                             access_log=args.access_log)


def serve(args: argparse.Namespace) -> int:
    """Run the server until interrupted. Returns the exit code (2 for bad settings)."""
    try:
        settings = settings_from_args(args)
    except SettingsError as err:
        print(f"gradstore serve: {err}", file=sys.stderr)
        return 2
    import uvicorn

    from .app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app(settings)  # checks GRADSTORE_FORGET_CONFIG
    except SettingsError as err:
        print(f"gradstore serve: {err}", file=sys.stderr)
        return 2
    engine, jobs = app.state.engine, app.state.jobs
    # Bound first, so that an unusable address is refused before anything is opened or run (pending jobs
    # included). Binding here, not in uvicorn, is also what lets port 0 work: the socket we hand over is the
    # one we report. A bound socket does not accept connections until uvicorn listens on it.
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((settings.host, settings.port))
    except OSError as err:
        sock.close()
        print(f"gradstore serve: cannot listen on {settings.host}:{settings.port}: {err}", file=sys.stderr)
        return 2
    # Started here rather than in the application's startup (which then finds them started), so that a
    # missing store, a model directory that is not one, or a model another server holds is one line on
    # stderr and exit 3 before anything listens, instead of "listening" followed by uvicorn's traceback.
    try:
        engine.start()
        jobs.start()
    except Exception as err:
        log.debug("startup failed", exc_info=True)
        sock.close()
        _stop(engine, jobs)
        print(f"gradstore serve: cannot start: {_describe(err)}", file=sys.stderr)
        return 3
    try:
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if family == socket.AF_INET6 else host
        print(f"gradstore-server listening on http://{shown}:{port}", flush=True)
        config = uvicorn.Config(app, log_level=settings.log_level, workers=1, access_log=settings.access_log,
                                timeout_graceful_shutdown=30)
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        return 0 if server.started else 3  # 3: uvicorn's own startup failed (its log says why)
    finally:
        _stop(engine, jobs)  # the application's shutdown did this already when it ran; stopping is idempotent


def _stop(engine: Any, jobs: Any) -> None:
    jobs.stop()
    engine.stop()  # releases (and removes) the model directory's lock file


def _describe(err: BaseException) -> str:
    from gradstore import GradStoreError

    # Errors that say what is wrong with the store or the model are shown as they are; anything else with
    # its type. One line either way (`--log-level debug` logs the traceback).
    expected = isinstance(err, (GradStoreError, OSError, RuntimeError, ValueError))
    text = str(err) if expected else f"{type(err).__name__}: {err}"
    return " ".join(text.split()) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="python -m gradstore_server",
                                                      description="Serve a gradstore over HTTP."))
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)
