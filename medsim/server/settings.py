"""The service's settings: one typed object, loaded from (lowest to highest priority) defaults, a TOML or JSON config
file, ``MEDSIM_*`` environment variables, and command-line flags.

Config file (TOML or JSON; the keys are the field names below, at the top level or under a ``[serve]`` table)::

    index = "cxr-index"
    pacs_url = "http://127.0.0.1:8042/dicom-web"
    host = "0.0.0.0"
    port = 8000
    cors_origins = ["http://localhost:3000"]
    allowed_hosts = ["medsim.example.org"]   # Host header names answered besides loopback (DNS rebinding guard)
    viewer_url_template = "/viewer?StudyInstanceUIDs={study_uid}"
    [serve.tokens]              # client name -> bearer token; the name is what the audit log records
    ohif = "a-long-random-token"

Environment: ``MEDSIM_<FIELD>`` in upper case, e.g. ``MEDSIM_PACS_URL``, ``MEDSIM_PORT``; lists are comma-separated
(``MEDSIM_CORS_ORIGINS=http://a,http://b``); ``MEDSIM_TOKENS=name:token,name2:token2``, or ``MEDSIM_TOKEN=token``
for one client called "default"; ``MEDSIM_CONFIG`` names a config file.

Nothing here imports Flask, so ``medsim --help`` stays fast.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from string import Formatter
from urllib.parse import urlsplit

from medsim.errors import MedsimError

ENV_PREFIX = "MEDSIM_"
VIEWER_PLACEHOLDERS = {"study_uid", "series_uid", "sop_uid"}
MIN_TOKEN_LENGTH = 16


class SettingsError(MedsimError):
    """A setting is missing, of the wrong type, or unsafe."""


@dataclass
class Settings:
    """Everything `medsim serve` can be told. Field docs are the help texts."""

    index: Path | None = None
    """index directory built by `medsim build-index` (required)"""
    pacs_url: str | None = None
    """DICOMweb root of the PACS, e.g. http://127.0.0.1:8042/dicom-web (needed to query non-indexed instances)"""
    host: str = "127.0.0.1"
    """interface to listen on; anything beyond loopback requires bearer tokens"""
    port: int = 8000
    """TCP port"""
    threads: int = 8
    """WSGI worker threads"""
    model: str | None = None
    """model bundle (default: the one that built the index)"""
    tokens: dict[str, str] = field(default_factory=dict)
    """client name -> bearer token; when any is set, every /api/v1 call needs one"""
    token_file: Path | None = None
    """file with one 'name:token' (or bare token) per line, added to tokens"""
    cors_origins: list[str] = field(default_factory=list)
    """origins (scheme://host[:port]) allowed to call the API from a browser, e.g. the viewer's"""
    viewer_url_template: str = "/viewer?StudyInstanceUIDs={study_uid}"
    """'open in viewer' link; placeholders {study_uid} {series_uid} {sop_uid}"""
    public_url: str = ""
    """prefix for URLs in responses (e.g. https://host/medsim); empty: relative to this server's root"""
    allowed_hosts: list[str] = field(default_factory=list)
    """host names (or IP addresses) that requests may name in their Host header, besides loopback (127.0.0.1,
localhost, [::1]), the host of public_url and a non-wildcard host; any port; others get 421 (guards against DNS
rebinding). '*' turns the check off (only with tokens)"""
    max_upload_bytes: int = 64 * 1024 * 1024
    """largest accepted request body (DICOM upload)"""
    max_instance_bytes: int = 256 * 1024 * 1024
    """largest instance fetched from the PACS"""
    pacs_timeout: float = 20.0
    """seconds to wait for PACS data (read timeout)"""
    pacs_connect_timeout: float = 3.0
    """seconds to wait for a connection to the PACS"""
    pacs_username: str | None = None
    """HTTP basic-auth user for the PACS"""
    pacs_password: str | None = None
    """HTTP basic-auth password for the PACS (prefer MEDSIM_PACS_PASSWORD)"""
    default_k: int = 10
    """results when a request does not say"""
    max_k: int = 100
    """most results a request may ask for"""
    cache_dir: Path | None = None
    """thumbnail cache and the server secret (default: $MEDSIM_HOME/server/<index>)"""
    thumbnail_size: int = 256
    """longest side of thumbnails, pixels"""
    audit_log: Path | None = None
    """append the audit log (JSON lines) to this file (default: standard error)"""
    secret_key: str | None = None
    """key for patient pseudonyms and signed thumbnail URLs (default: random, kept in cache_dir)"""
    pseudonymize_patient_ids: bool = True
    """return keyed hashes of patient IDs instead of the IDs the index holds"""
    vector_cache_size: int = 256
    """embeddings of non-indexed PACS instances kept in memory (0 disables)"""
    thumbnail_url_ttl: int = 3600
    """seconds a signed thumbnail URL stays valid (used when tokens are set)"""
    warm_up: bool = True
    """load the model and the vector graph at start-up rather than on the first query"""
    viewer_dir: Path | None = None
    """prebuilt OHIF viewer to serve at / with the medsim plugin and a DICOMweb proxy to pacs_url (`make viewer`)"""
    max_decode_pixels: int = 25_000_000
    """largest image (rows x columns) decoded for a query, upload or PACS instance; checked in the header before
decoding (detector images are at most ~4.3k x 4.3k = 18.5M pixels); larger ones get 413"""
    max_inflated_bytes: int = 128 * 1024 * 1024
    """largest size a deflated DICOM file (transfer syntax 1.2.840.10008.1.2.1.99) may inflate to; checked in a
bounded stream before it is parsed; larger ones get 413"""
    max_concurrent_decodes: int = 2
    """images decoded at once (one decode may take several hundred MB); further requests wait for a slot"""
    decode_queue_timeout: float = 5.0
    """seconds a request waits for a decode slot before it gets 503 with Retry-After"""
    index_check_interval: float = 2.0
    """seconds between checks for a newer committed index (build-index adding cases, calibrate), which is then
loaded in the background and swapped in atomically; 0: serve the index as loaded at start-up"""
    feedback: bool = True
    """store relevance votes (POST /api/v1/feedback) in the index's catalog; false: the catalog is never written and
votes get 409 read-only-index"""

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def load(cls, config_file: str | Path | None = None, env: typing.Mapping[str, str] | None = None,
             overrides: typing.Mapping[str, object] | None = None) -> "Settings":
        """Defaults < config file (argument, else $MEDSIM_CONFIG) < environment < overrides (CLI flags; None
        values are ignored)."""
        env = os.environ if env is None else env
        values: dict[str, object] = {}
        config_file = config_file or env.get(f"{ENV_PREFIX}CONFIG") or None
        if config_file:
            values.update(read_config_file(config_file))
        values.update(from_env(env))
        values.update({k: v for k, v in (overrides or {}).items() if v is not None})
        return cls.from_dict(values)

    @classmethod
    def from_dict(cls, values: typing.Mapping[str, object]) -> "Settings":
        hints = _hints()
        unknown = sorted(set(values) - set(hints))
        if unknown:
            raise SettingsError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(sorted(hints))})")
        return cls(**{name: coerce(name, hints[name], value) for name, value in values.items()})

    # ---- checks --------------------------------------------------------------------------------------------------

    def all_tokens(self) -> dict[str, str]:
        """tokens plus those in token_file."""
        tokens = dict(self.tokens)
        if self.token_file is not None:
            try:
                lines = Path(self.token_file).read_text().splitlines()
            except OSError as exc:
                raise SettingsError(f"cannot read token file {self.token_file}: {exc}") from None
            for number, line in enumerate(lines, 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                name, sep, token = line.partition(":")
                if not sep:
                    name, token = f"{Path(self.token_file).name}:{number}", line
                tokens[name.strip()] = token.strip()
        return tokens

    @property
    def listens_beyond_loopback(self) -> bool:
        return not is_loopback(self.host)

    def validate(self) -> "Settings":
        """Raise SettingsError for anything missing or unsafe; return self."""
        if self.index is None:
            raise SettingsError("no index: pass --index, set MEDSIM_INDEX, or 'index' in the config file")
        if self.pacs_url is not None and urlsplit(self.pacs_url).scheme not in ("http", "https"):
            raise SettingsError(f"pacs_url must be an http(s) DICOMweb URL, got {self.pacs_url!r}")
        tokens = self.all_tokens()
        for name, token in tokens.items():
            if len(token) < MIN_TOKEN_LENGTH:
                raise SettingsError(f"token {name!r} is shorter than {MIN_TOKEN_LENGTH} characters")
        if self.listens_beyond_loopback and not tokens:
            raise SettingsError(
                f"listening on {self.host} (beyond loopback) requires bearer tokens: set --token-file, MEDSIM_TOKEN "
                "or 'tokens' in the config file, or listen on 127.0.0.1"
            )
        for origin in self.cors_origins:
            parts = urlsplit(origin)
            if origin == "*" or parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise SettingsError(f"CORS origin must be scheme://host[:port] (no wildcard), got {origin!r}")
        try:
            names = {name for _, name, _, _ in Formatter().parse(self.viewer_url_template) if name is not None}
        except ValueError as exc:
            raise SettingsError(f"viewer_url_template: {exc}") from None
        if names - VIEWER_PLACEHOLDERS:
            raise SettingsError(f"viewer_url_template: unknown placeholder(s) {sorted(names - VIEWER_PLACEHOLDERS)}; "
                                f"use {sorted(VIEWER_PLACEHOLDERS)}")
        for entry in self.allowed_hosts:
            if entry == "*":
                if not tokens:
                    raise SettingsError("allowed_hosts '*' (any Host header) requires bearer tokens: without them "
                                        "any web page could read the API and the PACS by DNS rebinding")
            elif host_name(entry) is None:
                raise SettingsError(f"allowed_hosts: not a host name or IP address: {entry!r}")
        for name in ("port", "threads", "max_upload_bytes", "max_instance_bytes", "default_k", "max_k",
                     "thumbnail_size", "thumbnail_url_ttl"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{name} must be positive")
        if self.default_k > self.max_k:
            raise SettingsError("default_k must not exceed max_k")
        if self.pacs_timeout <= 0 or self.pacs_connect_timeout <= 0:
            raise SettingsError("PACS timeouts must be positive")
        return self

    def public(self) -> dict:
        """The settings without secrets (for logs)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["tokens"] = sorted(self.tokens)
        for secret in ("pacs_password", "secret_key"):
            if data[secret]:
                data[secret] = "***"
        return {k: str(v) if isinstance(v, Path) else v for k, v in data.items()}


def host_allow_list(settings: "Settings") -> frozenset[str] | None:
    """The host names a request's Host header may carry (lower case, no port, IPv6 without brackets): loopback, the
    host of ``public_url``, a listening address that is not a wildcard, and ``allowed_hosts``. None: any ('*')."""
    if "*" in settings.allowed_hosts:
        return None
    names = {"localhost", "127.0.0.1", "::1"}
    for entry in [settings.public_url, settings.host, *settings.allowed_hosts]:
        name = host_name(entry) if entry else None
        if name and name not in ("0.0.0.0", "::"):
            names.add(name)
    return frozenset(names)


def host_name(value: str) -> str | None:
    """The host name of a Host header, ``host[:port]``, ``[v6]:port`` or URL, normalised (lower case, no trailing
    dot, IPv6 without brackets); None when it is not a plausible host name or IP address."""
    value = (value or "").strip()
    if "//" in value:
        try:
            value = urlsplit(value).netloc.rsplit("@", 1)[-1]
        except ValueError:
            return None
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or (rest and not _PORT_RE.fullmatch(rest)):
            return None
        try:
            return ipaddress.IPv6Address(inside).compressed
        except ValueError:
            return None
    if value.count(":") > 1:  # a bare IPv6 address (a settings value, never a Host header)
        try:
            return ipaddress.IPv6Address(value).compressed
        except ValueError:
            return None
    name, _, port = value.partition(":")
    if _ and not _PORT_RE.fullmatch(":" + port):
        return None
    name = name.lower().rstrip(".")
    return name if _HOST_RE.fullmatch(name) else None


_HOST_RE = re.compile(r"(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_]([a-z0-9_-]{0,62}))*")
_PORT_RE = re.compile(r":[0-9]{1,5}")


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _hints() -> dict[str, object]:
    return typing.get_type_hints(Settings)


def help_text(name: str) -> str:
    """A field's docstring (the string literal after it in the class body)."""
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(Settings))
    body = tree.body[0].body
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", None) == name:
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                return str(following.value.value)
    return ""


def read_config_file(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SettingsError(f"cannot read config file {path}: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            data = tomllib.loads(text)
    except ValueError as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise SettingsError(f"config file {path} is not valid {path.suffix.lstrip('.').upper() or 'TOML'}: {exc}") \
            from None
    if not isinstance(data, dict):
        raise SettingsError(f"config file {path} must hold a table/object of settings")
    if isinstance(data.get("serve"), dict):
        data = {**{k: v for k, v in data.items() if k != "serve"}, **data["serve"]}
    base = path.parent.resolve()
    for key in ("index", "token_file", "cache_dir", "audit_log", "viewer_dir"):  # relative to the config file
        if isinstance(data.get(key), str) and not Path(data[key]).is_absolute():
            data[key] = str(base / data[key])
    return data


def from_env(env: typing.Mapping[str, str]) -> dict:
    values: dict[str, object] = {}
    for name in _hints():
        key = f"{ENV_PREFIX}{name.upper()}"
        if key in env and env[key] != "":
            values[name] = env[key]
    token = env.get(f"{ENV_PREFIX}TOKEN")
    if token:
        values["tokens"] = {**coerce("tokens", dict[str, str], values.get("tokens", {})), "default": token}
    return values


def coerce(name: str, hint, value):
    """Convert a config/env/CLI value to the field's type, or raise SettingsError naming the setting."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None or (isinstance(value, str) and value.lower() in ("", "none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(name, inner[0], value)
    try:
        if hint is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if hint is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(f"not an integer: {value!r}")
            return int(value)
        if hint is float:
            if isinstance(value, bool):
                raise ValueError(f"not a number: {value!r}")
            return float(value)
        if hint is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError(f"not a string: {value!r}")
            return str(value)
        if hint is Path:
            if not isinstance(value, (str, Path)):
                raise ValueError(f"not a path: {value!r}")
            return Path(value).expanduser()
        if origin is list:
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"not a list: {value!r}")
            return [coerce(name, args[0], v) for v in value]
        if origin is dict:
            if isinstance(value, str):
                pairs = [p.strip() for p in value.split(",") if p.strip()]
                value = dict(p.split(":", 1) for p in pairs if ":" in p)
                if len(value) != len(pairs):
                    raise ValueError("expected name:value pairs separated by commas")
            if not isinstance(value, dict):
                raise ValueError(f"not a table: {type(value).__name__}")
            return {str(k).strip(): coerce(name, args[1], v) for k, v in value.items()}
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name!r}: {exc}") from None
    raise SettingsError(f"setting {name!r}: unsupported type {hint}")


def add_arguments(parser) -> None:
    """`medsim serve` flags; each maps onto a Settings field (unset flags leave lower-priority sources alone)."""
    parser.add_argument("--config", type=Path, help="TOML or JSON config file (default: $MEDSIM_CONFIG)")
    parser.add_argument("--index", type=Path, help=help_text("index") + " (env MEDSIM_INDEX)")
    parser.add_argument("--pacs", dest="pacs_url", help=help_text("pacs_url") + " (env MEDSIM_PACS_URL)")
    parser.add_argument("--host", help=help_text("host") + " (default: 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (default: 8000)")
    parser.add_argument("--threads", type=int, help="WSGI worker threads (default: 8)")
    parser.add_argument("--model", help=help_text("model"))
    parser.add_argument("--token-file", type=Path, help=help_text("token_file") + " (or env MEDSIM_TOKEN)")
    parser.add_argument("--cors-origin", dest="cors_origins", action="append",
                        help="allow this browser origin (repeatable), e.g. http://localhost:3000")
    parser.add_argument("--viewer-url-template", help=help_text("viewer_url_template"))
    parser.add_argument("--public-url", help=help_text("public_url"))
    parser.add_argument("--allowed-host", dest="allowed_hosts", action="append", metavar="HOST",
                        help="also answer requests whose Host header names this host (repeatable), e.g. "
                        "medsim.example.org; loopback names and the host of --public-url always are; others get "
                        "421 (DNS rebinding guard) (env MEDSIM_ALLOWED_HOSTS, comma-separated)")
    parser.add_argument("--max-upload-mb", type=float, help="largest upload in MiB (default: 64)")
    parser.add_argument("--pacs-timeout", type=float, help=help_text("pacs_timeout") + " (default: 20)")
    parser.add_argument("--cache-dir", type=Path, help=help_text("cache_dir"))
    parser.add_argument("--audit-log", type=Path, help=help_text("audit_log"))
    parser.add_argument("--viewer", dest="viewer_dir", type=Path, nargs="?", const=Path("pinned"), metavar="DIR",
                        help=help_text("viewer_dir") + "; without DIR (or 'pinned'): the pinned OHIF viewer, "
                        "fetched at first use; e.g. var/ohif/3.13.2/dist (env MEDSIM_VIEWER_DIR)")


def settings_from_args(args) -> Settings:
    overrides = {
        name: getattr(args, name, None)
        for name in ("index", "pacs_url", "host", "port", "threads", "model", "token_file", "cors_origins",
                     "viewer_url_template", "public_url", "allowed_hosts", "pacs_timeout", "cache_dir", "audit_log",
                     "viewer_dir")
    }
    if getattr(args, "max_upload_mb", None) is not None:
        overrides["max_upload_bytes"] = int(args.max_upload_mb * 1024 * 1024)
    return Settings.load(config_file=getattr(args, "config", None), overrides=overrides)
