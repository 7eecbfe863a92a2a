"""Server settings: from keyword arguments, then `GRADSTORE_*` environment variables, then defaults.

Nothing secret lives in the code: the API keys come from `GRADSTORE_API_KEYS` (comma-separated) or from the
caller, and the server refuses to start without at least one.

    GRADSTORE_STORE              store URI (local path or s3://bucket/prefix)            required
    GRADSTORE_MODEL              directory of the model (`save_model` layout)            required
    GRADSTORE_API_KEYS           comma-separated API keys (16+ characters each)          required
    GRADSTORE_HOST / _PORT       where `gradstore serve` listens                         127.0.0.1 / 8000
    GRADSTORE_DEVICE             torch device of the model                               cpu
    GRADSTORE_STORAGE_OPTIONS    JSON object passed to the store (endpoint_url, ...)      none
    GRADSTORE_FORGET_CONFIG      JSON object of `ForgetConfig` fields                     library defaults
    GRADSTORE_DEFAULT_MODE       forget mode when a request names none                    first_epoch
    GRADSTORE_MAX_BODY_BYTES     larger request bodies get 413                            1048576
    GRADSTORE_MAX_QUEUED_JOBS    forget jobs waiting beyond this get 503                  100
    GRADSTORE_JOB_MAX_ATTEMPTS   runs of a job that a crash may interrupt before it is    3
                                 rolled back instead of run again
    GRADSTORE_LOG_LEVEL          critical, error, warning, info or debug                  info
    GRADSTORE_ACCESS_LOG         log every request line (1/0). Off by default: paths      0
                                 name example IDs, and erased IDs should not live on in logs
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

ENV_PREFIX = "GRADSTORE_"
MODES = ("first_epoch", "iterative")
LOG_LEVELS = ("critical", "error", "warning", "info", "debug")  # what both `logging` and uvicorn accept
MIN_KEY_LENGTH = 16


class SettingsError(ValueError):
    """A setting is missing or malformed (the message names it and its environment variable)."""


@dataclass(frozen=True)
class Settings:
    """Everything `create_app` needs. Build with `Settings.from_env(...)` to read `GRADSTORE_*` variables."""

    store: str
    model: str
    api_keys: tuple[str, ...]
    host: str = "127.0.0.1"
    port: int = 8000
    device: str = "cpu"
    storage_options: dict[str, Any] | None = None
    forget_config: dict[str, Any] = field(default_factory=dict)
    default_mode: str = "first_epoch"
    max_body_bytes: int = 1 << 20
    max_queued_jobs: int = 100
    job_max_attempts: int = 3
    log_level: str = "info"
    access_log: bool = False

    def __post_init__(self) -> None:
        if not self.store:
            raise SettingsError("no store: pass --store or set GRADSTORE_STORE")
        if not self.model:
            raise SettingsError("no model directory: pass --model or set GRADSTORE_MODEL")
        if isinstance(self.api_keys, str):
            raise SettingsError("api_keys must be a sequence of keys, not one string")
        keys = tuple(self.api_keys)
        if not keys:
            raise SettingsError("no API key: set GRADSTORE_API_KEYS (comma-separated) or pass --api-key; "
                                "every endpoint but /healthz requires one")
        for key in keys:
            # Keys travel in a header: no whitespace or commas (the separator), and long enough not to guess.
            if len(key) < MIN_KEY_LENGTH or any(c.isspace() or c == "," for c in key) or not key.isprintable():
                raise SettingsError(f"API keys need at least {MIN_KEY_LENGTH} printable characters without "
                                    "spaces or commas (one of the configured keys does not qualify)")
        object.__setattr__(self, "api_keys", keys)
        if self.log_level not in LOG_LEVELS:
            raise SettingsError(f"GRADSTORE_LOG_LEVEL must be one of {LOG_LEVELS}, got {self.log_level!r}")
        if self.default_mode not in MODES:
            raise SettingsError(f"GRADSTORE_DEFAULT_MODE must be one of {MODES}, got {self.default_mode!r}")
        for name, low in (("port", 0), ("max_body_bytes", 1024), ("max_queued_jobs", 1), ("job_max_attempts", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise SettingsError(f"{name} must be an integer >= {low}, got {value!r}")
        if self.port > 65535:
            raise SettingsError(f"port must be at most 65535, got {self.port}")
        if not isinstance(self.forget_config, dict):
            raise SettingsError("forget_config must be a JSON object of ForgetConfig fields")
        try:
            torch.device(self.device)  # a name torch does not know is a bad setting (a missing GPU is not)
        except (RuntimeError, TypeError) as err:
            raise SettingsError(f"GRADSTORE_DEVICE: unknown device {self.device!r}: {err}") from None

    def __repr__(self) -> str:  # never print the keys (logs, tracebacks)
        shown = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "api_keys"}
        shown["api_keys"] = f"<{len(self.api_keys)} keys>"
        return f"Settings({', '.join(f'{k}={v!r}' for k, v in shown.items())})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `overrides` (arguments that are not None win), else `GRADSTORE_*` variables, else defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            given = overrides.pop(f.name, None)
            if given is not None:
                values[f.name] = tuple(given) if f.name == "api_keys" else given
                continue
            raw = env.get(ENV_PREFIX + ("API_KEYS" if f.name == "api_keys" else f.name.upper()))
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, raw)
        if overrides:
            raise TypeError(f"unknown settings: {sorted(overrides)}")
        values.setdefault("store", "")
        values.setdefault("model", "")
        values.setdefault("api_keys", ())
        return cls(**values)


def _parse(name: str, raw: str) -> Any:
    variable = ENV_PREFIX + ("API_KEYS" if name == "api_keys" else name.upper())
    if name == "api_keys":
        return tuple(k.strip() for k in raw.split(",") if k.strip())
    if name in ("port", "max_body_bytes", "max_queued_jobs", "job_max_attempts"):
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{variable} must be an integer, got {raw!r}") from None
    if name == "access_log":
        value = raw.strip().lower()
        if value not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise SettingsError(f"{variable} must be 1 or 0, got {raw!r}")
        return value in ("1", "true", "yes", "on")
    if name == "log_level":
        return raw.strip().lower()  # INFO or info; the value is checked with the others
    if name in ("storage_options", "forget_config"):
        try:
            value = json.loads(raw)
        except ValueError:
            raise SettingsError(f"{variable} must be a JSON object") from None
        if not isinstance(value, dict):
            raise SettingsError(f"{variable} must be a JSON object, got {type(value).__name__}")
        return value
    return raw
