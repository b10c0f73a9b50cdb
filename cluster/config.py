"""Configuration: every setting declared once, fed by flags, environment and TOML.

After gunicorn's ``config.py``: a ``Setting`` names a setting, its flag, its type,
its default, its documentation and the commands that take it.  The same table
builds the argparse parser of each command, reads ``SIPCLUSTER_<NAME>`` from the
environment and ``<name> = ...`` from a TOML file (``--config``); the order of
precedence is flag, then environment, then file, then default.

A bad value raises ConfigError with a message naming the setting, which the
command line prints as one line.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

__all__ = [
    "SETTINGS",
    "ConfigError",
    "HostPort",
    "Listen",
    "Setting",
    "Settings",
    "add_arguments",
    "resolve",
    "settings_of",
]


class ConfigError(Exception):
    """A setting has a value that cannot be used."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """A host and a port; IPv6 hosts without brackets."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Listen:
    """A SIP listen socket: transport, host and port."""

    transport: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.transport}:{HostPort(self.host, self.port)}"


def parse_host_port(text: str, *, default_port: int | None = None) -> HostPort:
    """Parse ``HOST:PORT``, ``[V6]:PORT`` (or a bare host with ``default_port``).

    Raises ConfigError naming the problem.
    """
    text = text.strip()
    if text.startswith("["):
        close = text.find("]")
        if close < 0:
            raise ConfigError(f"{text!r}: missing ']' after an IPv6 address")
        host, rest = text[1:close], text[close + 1 :]
        if rest and not rest.startswith(":"):
            raise ConfigError(f"{text!r}: expected ':PORT' after ']'")
        port_text = rest[1:] if rest else ""
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    elif ":" in text:
        raise ConfigError(f"{text!r}: write an IPv6 address in brackets, [addr]:port")
    else:
        host, port_text = text, ""
    if not host:
        raise ConfigError(f"{text!r}: missing host")
    if not port_text:
        if default_port is None:
            raise ConfigError(f"{text!r}: missing ':PORT'")
        return HostPort(host, default_port)
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{text!r}: the port must be a number from 0 to 65535")
    return HostPort(host, int(port_text))


def parse_listen(text: str) -> Listen:
    """Parse ``udp:HOST:PORT`` or ``tcp:HOST:PORT``; raises ConfigError."""
    transport, colon, rest = text.partition(":")
    transport = transport.lower()
    if not colon or transport not in ("udp", "tcp"):
        raise ConfigError(f"{text!r}: a listen address is udp:HOST:PORT or tcp:HOST:PORT")
    address = parse_host_port(rest)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        raise ConfigError(f"{text!r}: listen on an IP address, not a name") from None
    return Listen(transport, address.host, address.port)


def parse_choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting one of ``choices`` (case-insensitive)."""

    def parse(text: str) -> str:
        lowered = text.strip().lower()
        if lowered not in choices:
            raise ConfigError(f"{text!r}: choose one of {', '.join(choices)}")
        return lowered

    return parse


def parse_positive_int(text: str) -> int:
    """A whole number above zero; raises ConfigError."""
    try:
        value = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{text!r}: expected a whole number") from None
    if value <= 0:
        raise ConfigError(f"{text!r}: expected a number above zero")
    return value


def parse_seconds(text: str) -> float:
    """A duration in seconds, zero or more; raises ConfigError."""
    try:
        value = float(str(text).strip())
    except ValueError:
        raise ConfigError(f"{text!r}: expected a number of seconds") from None
    if not value >= 0:
        raise ConfigError(f"{text!r}: expected zero or more seconds")
    return value


def parse_positive_seconds(text: str) -> float:
    """A duration in seconds, more than zero; raises ConfigError."""
    value = parse_seconds(text)
    if not value > 0:
        raise ConfigError(f"{text!r}: expected more than zero seconds")
    return value


def parse_algorithms(text: str) -> str:
    """A digest algorithm name, MD5 or SHA-256 (RFC 8760); raises ConfigError."""
    name = text.strip().upper()
    if name not in ("MD5", "SHA-256"):
        raise ConfigError(f"{text!r}: choose MD5 or SHA-256")
    return name


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0; raises ConfigError."""
    lowered = str(text).strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{text!r}: expected true or false")


def parse_domain(text: str) -> str:
    """A domain this server is responsible for, in lower case (RFC 3261 19.1.4)."""
    domain = text.strip().lower()
    if not domain or any(character in domain for character in " /@;:"):
        raise ConfigError(f"{text!r}: not a domain name")
    return domain


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: how it is spelled, parsed, defaulted and documented."""

    name: str
    """The attribute name; the flag is --name-with-dashes, the environment variable
    SIPCLUSTER_NAME, the TOML key name."""
    parse: Callable[[str], Any]
    """Turns one text value into the setting's value (raises ConfigError)."""
    default: Any
    """The value when nothing sets it (a tuple for a repeatable setting)."""
    help: str
    """One line of documentation."""
    commands: frozenset[str]
    """The commands that take it."""
    repeatable: bool = False
    """Whether the flag may be given several times (values form a tuple)."""
    metavar: str | None = None
    """How the value is shown in --help."""

    @property
    def flag(self) -> str:
        """The command-line flag."""
        return "--" + self.name.replace("_", "-")

    @property
    def environment(self) -> str:
        """The environment variable (repeatable settings: values separated by commas)."""
        return "SIPCLUSTER_" + self.name.upper()


_RUN = "run"
_LB = "lb"
_WORKER = "worker"
_ADMIN = "admin"  # user, status, locations, drain
_SERVERS = frozenset({_RUN, _LB, _WORKER})
_ALL = frozenset({_RUN, _LB, _WORKER, _ADMIN})


def _setting(
    default: Any,
    help: str,
    commands: frozenset[str],
    parse: Callable[[str], Any] = str,
    *,
    repeatable: bool = False,
    metavar: str | None = None,
) -> Any:
    """Declare a field of Settings together with how it is set (see Setting)."""
    return field(
        default=default,
        metadata={
            "parse": parse,
            "help": help,
            "commands": commands,
            "repeatable": repeatable,
            "metavar": metavar,
        },
    )


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Every setting of every sipcluster command, each declared once, here.

    A command reads the fields it takes (``Setting.commands``); the others keep
    their defaults.
    """

    etcd: str | None = _setting(
        None,
        "etcd client URL; `run` starts a local etcd when none is given",
        _ALL,
        metavar="URL",
    )
    local_etcd_port: int = _setting(
        2379,
        "client port of the etcd `run` starts when no --etcd is given (127.0.0.1)",
        frozenset({_RUN}),
        parse_positive_int,
        metavar="PORT",
    )
    etcd_prefix: str = _setting("/sipcluster/", "prefix of every etcd key of this cluster", _ALL)
    listen: tuple[Listen, ...] = _setting(
        (Listen("udp", "127.0.0.1", 5060), Listen("tcp", "127.0.0.1", 5060)),
        "a SIP socket, udp:HOST:PORT or tcp:HOST:PORT (repeatable)",
        frozenset({_RUN, _LB}),
        parse_listen,
        repeatable=True,
        metavar="TRANSPORT:HOST:PORT",
    )
    advertise: tuple[HostPort, ...] = _setting(
        (),
        "HOST:PORT written into Via and Record-Route for the listen socket of the same "
        "position, when it differs from the listen address (repeatable)",
        frozenset({_RUN, _LB}),
        parse_host_port,
        repeatable=True,
        metavar="HOST:PORT",
    )
    domain: tuple[str, ...] = _setting(
        (),
        "a domain this server is responsible for (repeatable; default: the listen hosts)",
        frozenset({_RUN, _WORKER}),
        parse_domain,
        repeatable=True,
        metavar="DOMAIN",
    )
    auth: str = _setting(
        "digest",
        "digest: challenge REGISTER (401) and requests from our users (407); none: no auth",
        frozenset({_RUN, _WORKER}),
        parse_choice("digest", "none"),
    )
    digest_algorithms: tuple[str, ...] = _setting(
        ("SHA-256", "MD5"),
        "digest algorithms offered, one challenge each, in this order (repeatable; many "
        "deployed UAs read only the first challenge and know only MD5: list MD5 first "
        "for them)",
        frozenset({_RUN, _WORKER}),
        parse_algorithms,
        repeatable=True,
        metavar="ALGORITHM",
    )
    nonce_secret_file: Path | None = _setting(
        None,
        "file holding the nonce secret; default: a secret generated once, kept in etcd",
        frozenset({_RUN, _WORKER}),
        Path,
        metavar="PATH",
    )
    mode: str = _setting(
        "proxy",
        "proxy: route calls through the cluster; redirect: answer INVITEs with 302",
        frozenset({_RUN, _WORKER}),
        parse_choice("proxy", "redirect"),
    )
    workers: int = _setting(
        os.cpu_count() or 1,
        "number of worker processes (default: the number of cores)",
        frozenset({_RUN}),
        parse_positive_int,
        metavar="N",
    )
    http: HostPort = _setting(
        HostPort("127.0.0.1", 9060),
        "HOST:PORT of the HTTP endpoint (/healthz, /readyz, /metrics)",
        _SERVERS,
        parse_host_port,
        metavar="HOST:PORT",
    )
    data_dir: Path = _setting(
        Path(".sipcluster"),
        "directory for the local etcd's data and the processes' sockets",
        _SERVERS,
        Path,
        metavar="PATH",
    )
    zmq_bind: str | None = _setting(
        None,
        "ZeroMQ endpoint this process's inbox binds (default: an ipc socket in --data-dir)",
        frozenset({_LB, _WORKER}),
        metavar="ENDPOINT",
    )
    zmq_advertise: str | None = _setting(
        None,
        "ZeroMQ endpoint peers connect to, when it differs from --zmq-bind",
        frozenset({_LB, _WORKER}),
        metavar="ENDPOINT",
    )
    id: str | None = _setting(
        None,
        "this process's id in the cluster (letters and digits; default: generated)",
        frozenset({_LB, _WORKER}),
    )
    batch_delay: float = _setting(
        0.002,
        "shortest interval in seconds between two ZeroMQ frames a process sends (what "
        "gathers meanwhile shares a frame; after a quiet spell a message leaves at once); "
        "0 sends at the end of each event-loop pass (docs/performance.md)",
        frozenset({_RUN, _LB, _WORKER}),
        parse_seconds,
        metavar="SECONDS",
    )
    tcp_idle_timeout: float = _setting(
        300.0,
        "seconds without traffic after which a load balancer closes a TCP connection",
        frozenset({_RUN, _LB}),
        parse_seconds,
        metavar="SECONDS",
    )
    lease_ttl: int = _setting(
        3,
        "seconds a process stays a member after its last keepalive to etcd",
        _SERVERS,
        parse_positive_int,
        metavar="SECONDS",
    )
    min_expires: int = _setting(
        60,
        "shortest registration accepted; shorter ones get 423 (RFC 3261 10.3 step 7)",
        frozenset({_RUN, _WORKER}),
        parse_positive_int,
        metavar="SECONDS",
    )
    max_expires: int = _setting(
        7200,
        "longest registration granted; longer ones are shortened to it",
        frozenset({_RUN, _WORKER}),
        parse_positive_int,
        metavar="SECONDS",
    )
    default_expires: int = _setting(
        3600,
        "expiry of a contact that asks for none (RFC 3261 10.3 step 7)",
        frozenset({_RUN, _WORKER}),
        parse_positive_int,
        metavar="SECONDS",
    )
    max_contacts: int = _setting(
        10,
        "most contacts one address of record may hold",
        frozenset({_RUN, _WORKER}),
        parse_positive_int,
        metavar="N",
    )
    forking: str = _setting(
        "parallel",
        "try an AoR's contacts all at once, or one after the other by q-value",
        frozenset({_RUN, _WORKER}),
        parse_choice("parallel", "serial"),
    )
    max_breadth: int = _setting(
        60,
        "most parallel branches of one request (RFC 5393 Max-Breadth)",
        frozenset({_RUN, _WORKER}),
        parse_positive_int,
        metavar="N",
    )
    t1: float = _setting(
        0.5,
        "T1, the round-trip time estimate the SIP timers derive from (RFC 3261 17.1.1.1); "
        "a server transaction absorbs retransmissions for 64*T1",
        frozenset({_RUN, _WORKER}),
        parse_positive_seconds,
        metavar="SECONDS",
    )
    timer_c: float = _setting(
        180.0,
        "Timer C: how long a proxied INVITE may go without a provisional response before "
        "the proxy cancels it (RFC 3261 16.6 step 11: more than 3 minutes)",
        frozenset({_RUN, _WORKER}),
        parse_positive_seconds,
        metavar="SECONDS",
    )
    drain_timeout: float | None = _setting(
        None,
        "seconds a draining worker waits for its transactions to end before it leaves the "
        "cluster anyway (default: Timer C + 64*T1, so that a call still ringing completes)",
        frozenset({_RUN, _WORKER}),
        parse_seconds,
        metavar="SECONDS",
    )
    overload_target: float = _setting(
        0.020,
        "queueing delay (seconds) above which a worker refuses a growing share of new "
        "requests with 503 (RFC 6357); 0 turns overload control off",
        frozenset({_RUN, _WORKER}),
        parse_seconds,
        metavar="SECONDS",
    )
    commit_window: float = _setting(
        0.010,
        "seconds a worker gathers binding changes into one etcd transaction before it "
        "commits them (group commit): each REGISTER's 200 waits up to this long; shorter "
        "answers sooner for more CPU per REGISTER (docs/performance.md); 0 commits at the "
        "end of each event-loop pass",
        frozenset({_RUN, _WORKER}),
        parse_seconds,
        metavar="SECONDS",
    )
    log_level: str = _setting(
        "info",
        "the least severe log records written",
        _SERVERS,
        parse_choice("debug", "info", "warning", "error"),
    )
    log_json: bool = _setting(False, "write logs as JSON lines", _SERVERS, parse_bool)

    @property
    def drain_seconds(self) -> float:
        """The drain timeout in effect (``drain_timeout`` or Timer C + 64*T1)."""
        if self.drain_timeout is not None:
            return self.drain_timeout
        return self.timer_c + 64 * self.t1


SETTINGS: tuple[Setting, ...] = tuple(
    Setting(name=item.name, default=item.default, **item.metadata) for item in fields(Settings)
)
_BY_NAME = {setting.name: setting for setting in SETTINGS}


def settings_of(command: str) -> list[Setting]:
    """The settings ``command`` takes, in declaration order."""
    return [setting for setting in SETTINGS if command in setting.commands]


def add_arguments(parser: argparse.ArgumentParser, command: str) -> None:
    """Add the flags of ``command``'s settings to ``parser`` (values stay text;
    ``resolve`` parses them, so that every source is checked the same way)."""
    parser.add_argument("--config", metavar="PATH", help="TOML file with settings")
    for setting in settings_of(command):
        default_text = setting.default
        if isinstance(default_text, tuple):
            default_text = ", ".join(map(str, default_text)) or "none"
        # A yes/no flag alone means yes: ``--log-json`` as ``--log-json true``.
        flag_alone: dict[str, Any] = (
            {"nargs": "?", "const": "true"} if setting.parse is parse_bool else {}
        )
        parser.add_argument(
            setting.flag,
            dest=setting.name,
            action="append" if setting.repeatable else "store",
            default=None,
            metavar=setting.metavar or setting.name.upper(),
            help=f"{setting.help} [{setting.environment}; default: {default_text}]",
            **flag_alone,
        )


def _parse(setting: Setting, raw: Any, source: str) -> Any:
    try:
        if setting.repeatable:
            if isinstance(raw, str):
                raw = [item for item in raw.split(",") if item.strip()]
            if not isinstance(raw, list):
                raise ConfigError(f"expected a list, not {raw!r}")
            return tuple(setting.parse(str(item)) for item in raw)
        if isinstance(raw, bool | int | float):
            raw = str(raw)
        if not isinstance(raw, str):
            raise ConfigError(f"expected a value, not {raw!r}")
        return setting.parse(raw)
    except ConfigError as error:
        raise ConfigError(f"{setting.flag} ({source}): {error}") from None
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{setting.flag} ({source}): {error}") from None


def _read_file(path: str, command: str) -> dict[str, Any]:
    try:
        values = tomllib.loads(Path(path).read_text())
    except OSError as error:
        raise ConfigError(f"--config {path}: {error.strerror}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"--config {path}: {error}") from None
    normalized = {key.replace("-", "_"): value for key, value in values.items()}
    unknown = sorted(
        key for key in normalized if key not in _BY_NAME or command not in _BY_NAME[key].commands
    )
    if unknown:
        raise ConfigError(f"--config {path}: settings {', '.join(unknown)} do not apply here")
    return normalized


def resolve(
    command: str,
    arguments: argparse.Namespace,
    environment: Mapping[str, str] | None = None,
) -> Settings:
    """The value of every setting of ``command``: flag, environment, file, default.

    Raises ConfigError naming the setting and where its bad value came from.
    """
    environment = os.environ if environment is None else environment
    config_path = getattr(arguments, "config", None) or environment.get("SIPCLUSTER_CONFIG")
    file_values = _read_file(config_path, command) if config_path else {}
    values: dict[str, Any] = {}
    for setting in settings_of(command):
        flag_value = getattr(arguments, setting.name, None)
        if flag_value is not None:
            values[setting.name] = _parse(setting, flag_value, "flag")
        elif setting.environment in environment:
            values[setting.name] = _parse(
                setting, environment[setting.environment], setting.environment
            )
        elif setting.name in file_values:
            values[setting.name] = _parse(setting, file_values[setting.name], "config file")
    return Settings(**values)


def documentation() -> str:
    """A Markdown table of every setting, for the docs."""
    lines = ["| flag | environment | commands | default | meaning |", "|---|---|---|---|---|"]
    for setting in SETTINGS:
        default = setting.default
        if isinstance(default, tuple):
            default = ", ".join(map(str, default)) or "-"
        commands = ", ".join(sorted(setting.commands))
        lines.append(
            f"| `{setting.flag}` | `{setting.environment}` | {commands} | `{default}` | "
            f"{setting.help} |"
        )
    return "\n".join(lines)
