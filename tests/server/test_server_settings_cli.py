"""Settings from arguments and GRADSTORE_* variables; the `serve` command's registration and argument handling."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

import pytest
from server_support import API_KEY

from gradstore_server import Settings, SettingsError
from gradstore_server.cli import add_serve_command, main, settings_from_args

ENV = {"GRADSTORE_STORE": "s3://bucket/store", "GRADSTORE_MODEL": "runs/model",
       "GRADSTORE_API_KEYS": f"{API_KEY}, second-key-0123456789", "GRADSTORE_PORT": "9000",
       "GRADSTORE_STORAGE_OPTIONS": '{"endpoint_url": "http://127.0.0.1:9999"}',
       "GRADSTORE_FORGET_CONFIG": '{"max_iterations": 5}', "GRADSTORE_DEFAULT_MODE": "iterative"}


def test_settings_from_environment():
    settings = Settings.from_env(ENV)
    assert settings.store == "s3://bucket/store" and settings.port == 9000 and settings.host == "127.0.0.1"
    assert settings.api_keys == (API_KEY, "second-key-0123456789")
    assert settings.storage_options == {"endpoint_url": "http://127.0.0.1:9999"}
    assert settings.forget_config == {"max_iterations": 5} and settings.default_mode == "iterative"
    assert settings.access_log is False and Settings.from_env({**ENV, "GRADSTORE_ACCESS_LOG": "1"}).access_log


def test_arguments_override_the_environment():
    settings = Settings.from_env(ENV, store="local/store", port=0, api_keys=["cli-key-0123456789abc"])
    assert settings.store == "local/store" and settings.port == 0 and settings.api_keys == ("cli-key-0123456789abc",)
    assert settings.model == "runs/model"


def test_keys_never_show_in_repr():
    assert API_KEY not in repr(Settings.from_env(ENV))
    assert "<2 keys>" in repr(Settings.from_env(ENV))


@pytest.mark.parametrize(("change", "message"), [
    ({"GRADSTORE_API_KEYS": ""}, "no API key"),
    ({"GRADSTORE_API_KEYS": "short"}, "at least 16"),
    ({"GRADSTORE_STORE": ""}, "no store"),
    ({"GRADSTORE_PORT": "http"}, "GRADSTORE_PORT must be an integer"),
    ({"GRADSTORE_PORT": "70000"}, "at most 65535"),
    ({"GRADSTORE_STORAGE_OPTIONS": "[1]"}, "JSON object"),
    ({"GRADSTORE_FORGET_CONFIG": "{"}, "JSON object"),
    ({"GRADSTORE_DEFAULT_MODE": "fast"}, "DEFAULT_MODE"),
    ({"GRADSTORE_JOB_MAX_ATTEMPTS": "0"}, "job_max_attempts"),
    ({"GRADSTORE_ACCESS_LOG": "maybe"}, "ACCESS_LOG"),
    ({"GRADSTORE_LOG_LEVEL": "verbose"}, "GRADSTORE_LOG_LEVEL must be one of"),
])
def test_bad_settings_are_named(change, message):
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({**ENV, **change})


def test_unknown_forget_config_fails_at_app_creation(workspace):
    from gradstore_server import create_app

    with pytest.raises(SettingsError, match="FORGET_CONFIG"):
        create_app(workspace.settings(forget_config={"no_such_field": 1}))
    with pytest.raises(SettingsError, match="row_weighting"):
        create_app(workspace.settings(forget_config={"row_weighting": "bogus"}))


def test_add_serve_command_registers_serve():
    parser = argparse.ArgumentParser(prog="gradstore")
    add_serve_command(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["serve", "--store", "st", "--model", "md", "--port", "0", "--api-key", API_KEY,
                              "--storage-option", "endpoint_url=http://x", "--storage-option", "key=k"])
    assert args.func.__name__ == "serve"
    settings = settings_from_args(args)
    assert (settings.store, settings.model, settings.port, settings.host) == ("st", "md", 0, "127.0.0.1")
    assert settings.storage_options == {"endpoint_url": "http://x", "key": "k"}


def test_serve_without_settings_exits_2(monkeypatch, capsys):
    for name in ("GRADSTORE_STORE", "GRADSTORE_MODEL", "GRADSTORE_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--store", "x", "--model", "y"]) == 2
    assert "no API key" in capsys.readouterr().err
    monkeypatch.setenv("GRADSTORE_API_KEYS", API_KEY)
    assert main(["--store", "x", "--model", "y", "--storage-option", "novalue"]) == 2
    capsys.readouterr()
    monkeypatch.setenv("GRADSTORE_LOG_LEVEL", "verbose")  # was a traceback from `logging` and exit 1
    assert main(["--store", "x", "--model", "y"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "GRADSTORE_LOG_LEVEL must be one of" in err
    monkeypatch.setenv("GRADSTORE_LOG_LEVEL", "DEBUG")
    assert settings_from_args(argparse.Namespace(store="x", model="y", host=None, port=None, device=None,
                                                 api_key=None, storage_option=None, log_level=None,
                                                 access_log=None)).log_level == "debug"


def test_module_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "gradstore_server", "--help"], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "--store" in out and "--port" in out and "GRADSTORE_API_KEYS" in out


@pytest.mark.parametrize(("where", "code", "message"), [
    ("store", 3, "gradstore serve: cannot start: no store at"),
    ("model", 3, "is not a saved model (no config.json)"),
    ("forget_config", 2, "gradstore serve: GRADSTORE_FORGET_CONFIG:"),
])
def test_serve_fails_before_listening(workspace, monkeypatch, capsys, where, code, message):
    """A bad store, model or forget config: one line and the documented exit code, before the socket is bound
    (no "listening", no traceback), and no lock file left in the model directory."""
    monkeypatch.setenv("GRADSTORE_API_KEYS", API_KEY)
    monkeypatch.setenv("GRADSTORE_FORGET_CONFIG", '{"no_such_field": 1}' if where == "forget_config" else "{}")
    store = workspace.store.parent / "missing" if where == "store" else workspace.store
    model = workspace.store if where == "model" else workspace.model
    assert main(["--store", str(store), "--model", str(model), "--port", "0"]) == code
    out, err = capsys.readouterr()
    assert "listening" not in out
    assert len(err.strip().splitlines()) == 1 and message in err, err
    assert not (workspace.model / ".gradstore-server.lock").exists()


def test_an_unusable_address_exits_2_having_opened_nothing(workspace, monkeypatch, capsys):
    """The address is bound before the store and the model are opened: a pending job must not run (and
    commit) in a server that then cannot listen."""
    from gradstore_server.engine import Engine

    monkeypatch.setenv("GRADSTORE_API_KEYS", API_KEY)
    started = []
    monkeypatch.setattr(Engine, "start", lambda self: started.append(self))
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    try:
        for host, port in (("127.0.0.1", holder.getsockname()[1]), ("256.1.1.1", 0)):
            argv = ["--store", str(workspace.store), "--model", str(workspace.model), "--host", host,
                    "--port", str(port)]
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert len(err.strip().splitlines()) == 1 and f"cannot listen on {host}:{port}" in err, err
    finally:
        holder.close()
    assert not started
    assert not (workspace.model / ".gradstore-server.lock").exists()
