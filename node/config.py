"""The node's configuration: one INI file (``config.ini``), validated on load.

:func:`load_config` reads the file, refuses unknown sections and keys (a typo
must not pass silently), checks every value and resolves relative paths against
the file's own folder. The result is a frozen :class:`NodeConfig`;
``lobevol config check`` prints its :meth:`NodeConfig.describe`.

Remote AEs are sections named ``[remote NAME]`` where NAME is the AE title; one with a
``stow_url`` gets results by DICOMweb STOW-RS (:class:`StowSettings`) instead of C-STORE.

Each section is parsed once, here, into a frozen settings object handed whole to
whoever needs it: ``[inference]`` into :class:`InferenceSettings` (every segmenter
is built from one, by ``node.service.worker.load_segmenter``), ``[outputs]`` and
``[selection]`` into ``node.pipeline.PipelineSettings`` (``NodeConfig.pipeline``),
``[retry]`` and ``[tls]`` into :class:`RetryPolicy` and :class:`TLSSettings`.

To add a key: its default (as text) in :data:`KNOWN` (or a field of
``PipelineSettings`` / ``SelectionRules`` for ``[outputs]`` / ``[selection]``); a
field on its section's settings class, whose ``__post_init__`` checks the value;
one line in :func:`config_from_parser` reading it with ``values.text / number /
integer / flag`` (errors name the section and key); its name in
:meth:`NodeConfig.describe` so that ``lobevol config check`` shows it; and a
commented line in config.ini (tests/test_config.py checks every key has one).
"""
from __future__ import annotations

import configparser
import dataclasses
import re
import ssl
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from node.pipeline import PipelineSettings

#: AE titles: 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 6.2).
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
REMOTE_PREFIX = "remote "

#: Every section and key the file may hold, with its default (None: no default, value required
#: when the section is present). Sections [selection] and [outputs] are parsed, once, by
#: node.pipeline.PipelineSettings.from_mapping (their keys are its fields).
KNOWN: dict[str, dict[str, str]] = {
    "node": {
        "ae_title": "LOBEVOL", "bind_address": "127.0.0.1", "port": "11112", "max_associations": "8",
        "log_patient_identifiers": "no", "shutdown_grace_s": "120", "association_request_timeout_s": "10",
        "network_timeout_s": "60", "max_pending_connections": "32",
    },
    "storage": {
        "spool": "var/spool", "results": "var/results", "database": "var/lobevol.sqlite",
        "max_instance_mb": "200", "max_instances_per_study": "5000", "disk_high_water_percent": "90",
    },
    "series": {"stability_s": "15"},
    "inference": {"method": "network", "cross_check": "yes", "cross_check_min_dice": "0.2", "device": "auto",
                  "threads": "", "model": "", "tta": "yes", "refine_surface": "yes", "job_timeout_s": "1800"},
    "results": {"send_to_origin": "yes", "extra_destinations": ""},
    "retry": {"first_delay_s": "10", "max_delay_s": "600", "max_attempts": "8"},
    "retention": {"images_hours": "24", "results_days": "30"},
    "tls": {
        "enabled": "no", "certificate": "", "private_key": "", "ca_certificates": "",
        "require_client_certificate": "yes",
    },
}
PIPELINE_SECTIONS = ("selection", "outputs")
#: host and port are required unless the remote is reached by DICOMweb (stow_url).
REMOTE_KEYS = {"host": None, "port": None, "may_send": "no", "may_receive": "no", "check_host": "no",
               "stow_url": "", "stow_username": "", "stow_password_file": "", "stow_token_file": "",
               "stow_ca_certificates": "", "stow_timeout_s": "60"}


_LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class StowSettings:
    """A DICOMweb server that takes our results by STOW-RS (PS3.18 10.5).

    Secrets are never in the config file: the password or the bearer token is
    read from a file (its first line) at each delivery, so a token rotated by
    another program is picked up without a restart.

    Attributes:
        url: the DICOMweb service root, e.g. ``https://pacs.example.org/dicom-web``
            (we POST to ``{url}/studies``).
        username: HTTP basic authentication user (with ``password_file``).
        password_file: file holding that user's password.
        token_file: file holding a bearer token (instead of basic authentication).
        ca_certificates: CA bundle (PEM) that verifies an https server; None: the system's CAs.
        timeout_s: seconds to wait for the connection and for the answer to each request.
    """

    url: str
    username: str | None = None
    password_file: Path | None = None
    token_file: Path | None = None
    ca_certificates: Path | None = None
    timeout_s: float = 60.0

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"stow_url {self.url!r} is not an http:// or https:// URL with a host")
        if parts.username is not None or parts.password is not None:
            raise ValueError("stow_url must not hold credentials: use stow_username with stow_password_file, "
                             "or stow_token_file")
        if parts.query or parts.fragment:
            raise ValueError(f"stow_url {self.url!r}: the DICOMweb root takes no query or fragment")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("basic authentication needs both stow_username and stow_password_file")
        if self.username is not None and self.token_file is not None:
            raise ValueError("give either basic authentication (stow_username) or a bearer token (stow_token_file), "
                             "not both")
        if self.authenticated and parts.scheme == "http" and parts.hostname not in _LOOPBACK_HOSTS:
            raise ValueError(f"stow_url {self.url!r}: credentials would cross the network in clear; use https://")
        if self.ca_certificates is not None and parts.scheme != "https":
            raise ValueError("stow_ca_certificates applies to an https:// stow_url only")
        for name in ("password_file", "token_file", "ca_certificates"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise FileNotFoundError(f"stow_{name} {path} does not exist")
        if not self.timeout_s > 0:
            raise ValueError(f"stow_timeout_s {self.timeout_s:g} must be more than 0")

    @property
    def authenticated(self) -> bool:
        return self.password_file is not None or self.token_file is not None

    def describe(self) -> str:
        """The URL and how we authenticate, without any secret."""
        if self.username is not None:
            auth = f"basic auth as {self.username}, password from {self.password_file}"
        elif self.token_file is not None:
            auth = f"bearer token from {self.token_file}"
        else:
            auth = "no authentication"
        ca = f", CAs {self.ca_certificates}" if self.ca_certificates else ""
        return f"STOW-RS {self.url} ({auth}{ca})"


@dataclass(frozen=True)
class RemoteAE:
    """A peer we know: who may send to us and who may receive our results.

    Attributes:
        ae_title: its AE title (what it sends as calling AE, what we call it).
        host: host name or IP address.
        port: its DICOM port.
        may_send: it may open associations to us (C-STORE, C-ECHO).
        may_receive: we may send results to it.
        check_host: refuse its AE title when the association comes from another address.
        stow: results go to this DICOMweb server by STOW-RS instead of by C-STORE; host and
            port may then be left out (they are needed only for check_host and C-ECHO).
    """

    ae_title: str
    host: str
    port: int
    may_send: bool = False
    may_receive: bool = False
    check_host: bool = False
    stow: StowSettings | None = None

    def __post_init__(self) -> None:
        _check_ae_title(self.ae_title, f"remote {self.ae_title!r}")
        if self.stow is not None and not self.host.strip() and not self.port:
            if self.check_host:
                raise ValueError(f"remote {self.ae_title}: check_host needs a host")
            return  # reached by DICOMweb only
        if not self.host.strip():
            raise ValueError(f"remote {self.ae_title}: host is empty")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"remote {self.ae_title}: port {self.port} is not in 1-65535")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for sending results: first_delay_s, doubled each attempt up to max_delay_s.

    After ``max_attempts`` failed attempts a destination's items end as failed.
    """

    first_delay_s: float = 10.0
    max_delay_s: float = 600.0
    max_attempts: int = 8

    def __post_init__(self) -> None:
        if not self.first_delay_s > 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("[retry] needs 0 < first_delay_s <= max_delay_s")
        if self.max_attempts < 1:
            raise ValueError("[retry] max_attempts must be at least 1")

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        return min(self.first_delay_s * 2 ** max(attempts - 1, 0), self.max_delay_s)


@dataclass(frozen=True)
class TLSSettings:
    """Optional TLS for both directions (our certificate and key, the CAs we trust)."""

    enabled: bool = False
    certificate: Path | None = None
    private_key: Path | None = None
    ca_certificates: Path | None = None
    require_client_certificate: bool = True

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        for name in ("certificate", "private_key", "ca_certificates"):
            path = getattr(self, name)
            if path is None:
                raise ValueError(f"[tls] is enabled but {name} is not set")
            if not path.is_file():
                raise FileNotFoundError(f"[tls] {name} {path} does not exist")

    def server_context(self) -> ssl.SSLContext | None:
        """The context for our SCP, or None when TLS is off."""
        if not self.enabled:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(self.ca_certificates))
        context.load_cert_chain(str(self.certificate), str(self.private_key))
        context.verify_mode = ssl.CERT_REQUIRED if self.require_client_certificate else ssl.CERT_OPTIONAL
        return context

    def client_context(self, host: str) -> tuple[ssl.SSLContext, str] | None:
        """(context, server host name) for our SCU, or None when TLS is off."""
        if not self.enabled:
            return None
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_certificates))
        context.load_cert_chain(str(self.certificate), str(self.private_key))
        return context, host


#: Segmentation methods of ``[inference] method``: the network, or the template registration.
METHODS = ("network", "atlas")


@dataclass(frozen=True)
class InferenceSettings:
    """How the regions are made: the ``[inference]`` section, or a command's options.

    :func:`node.service.worker.load_segmenter` builds every segmenter (network, atlas,
    cross-checked) from one of these.

    Attributes:
        method: "network" (the 3D ResU-Net) or "atlas" (template registration).
        model: network checkpoint; None: the bundled one.
        device: "auto", "cpu", "cuda" or "cuda:N".
        threads: CPU threads for torch and SimpleITK; None: their default.
        tta: average with the left-right mirrored prediction (network only).
        refine_surface: move the lobes' edge to the image's CSF/brain contrast.
        cross_check: the other method runs too and the two are compared.
        cross_check_min_dice: per-region Dice (0-1) below which the methods disagree.
    """

    method: str = "network"
    model: Path | None = None
    device: str = "auto"
    threads: int | None = None
    tta: bool = True
    refine_surface: bool = True
    cross_check: bool = False
    cross_check_min_dice: float = 0.2

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method = {self.method!r}: expected {' or '.join(METHODS)}")
        if self.device not in ("auto", "cpu", "cuda") and not re.fullmatch(r"cuda:\d+", self.device):
            raise ValueError(f"device = {self.device!r}: expected auto, cpu, cuda or cuda:N")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads = {self.threads}: expected at least 1")
        if not 0 <= self.cross_check_min_dice <= 1:
            raise ValueError(f"cross_check_min_dice = {self.cross_check_min_dice:g}: expected a number from 0 to 1")


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of the node (see config.ini for the meaning of each; sizes in bytes, times in s)."""

    source: Path | None
    ae_title: str = "LOBEVOL"
    bind_address: str = "127.0.0.1"
    port: int = 11112
    max_associations: int = 8
    log_patient_identifiers: bool = False
    shutdown_grace_s: float = 120.0
    association_request_timeout_s: float = 10.0
    network_timeout_s: float = 60.0
    max_pending_connections: int = 32
    spool_dir: Path = Path("var/spool")
    results_dir: Path = Path("var/results")
    database: Path = Path("var/lobevol.sqlite")
    max_instance_bytes: int = 200 * 2**20
    max_instances_per_study: int = 5000
    disk_high_water_percent: float = 90.0
    stability_s: float = 15.0
    #: The [inference] section; its defaults are KNOWN's (cross_check on), not a bare InferenceSettings'.
    inference: InferenceSettings = field(default_factory=lambda: InferenceSettings(cross_check=True))
    job_timeout_s: float = 1800.0
    send_to_origin: bool = True
    extra_destinations: tuple[str, ...] = ()
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    images_retention_s: float = 24 * 3600.0
    results_retention_s: float = 30 * 86400.0
    tls: TLSSettings = field(default_factory=TLSSettings)
    remotes: Mapping[str, RemoteAE] = field(default_factory=dict)
    #: The [outputs] and [selection] sections, parsed and validated on load; None: the defaults.
    pipeline: PipelineSettings | None = None

    def __post_init__(self) -> None:
        if self.pipeline is None:
            from node.pipeline import PipelineSettings  # not at import: it pulls in pydicom

            object.__setattr__(self, "pipeline", PipelineSettings())

    def remote(self, ae_title: str) -> RemoteAE:
        """The remote AE with this title; KeyError naming the known ones when there is none."""
        try:
            return self.remotes[ae_title]
        except KeyError:
            known = ", ".join(sorted(self.remotes)) or "none"
            raise KeyError(f"AE title {ae_title!r} is not in the remote table (known: {known})") from None

    def result_destinations(self, origin_ae: str | None) -> tuple[list[RemoteAE], list[str]]:
        """Where a job's results go: (destinations, notes on destinations left out and why)."""
        titles, notes = [], []
        if self.send_to_origin and origin_ae:
            if origin_ae not in self.remotes:
                notes.append(f"origin {origin_ae} is not in the remote table")
            elif not self.remotes[origin_ae].may_receive:
                notes.append(f"origin {origin_ae} may not receive results (may_receive = no)")
            else:
                titles.append(origin_ae)
        titles += [t for t in self.extra_destinations if t not in titles]
        return [self.remotes[t] for t in titles], notes

    def describe(self) -> str:
        """The effective settings, one per line (what ``lobevol config check`` prints)."""
        lines = [f"configuration: {self.source or '(built-in defaults)'}"]
        for name in ("ae_title", "bind_address", "port", "max_associations", "log_patient_identifiers",
                     "shutdown_grace_s", "association_request_timeout_s", "network_timeout_s",
                     "max_pending_connections", "spool_dir", "results_dir", "database", "max_instance_bytes",
                     "max_instances_per_study", "disk_high_water_percent", "stability_s", "method", "cross_check",
                     "cross_check_min_dice", "device", "threads", "model", "tta", "refine_surface", "job_timeout_s",
                     "send_to_origin", "extra_destinations", "images_retention_s", "results_retention_s"):
            value = getattr(self.inference if name in _INFERENCE_FIELDS else self, name)
            if name == "model" and value is None:
                value = "(bundled model)"
            lines.append(f"  {name:<36}{value}")
        lines.append(f"  {'retry':<36}first {self.retry.first_delay_s:g} s, doubling up to "
                     f"{self.retry.max_delay_s:g} s, {self.retry.max_attempts} attempts")
        lines.append(f"  {'tls':<36}" + (f"on (certificate {self.tls.certificate}, client certificate "
                                             f"{'required' if self.tls.require_client_certificate else 'optional'})"
                                             if self.tls.enabled else "off"))
        settings = self.pipeline
        lines.append(f"  {'outputs':<36}seg {settings.seg_type}, sr {_yes(settings.write_sr)}, "
                     f"pdf {_yes(settings.write_pdf)}, overlays {_yes(settings.write_overlays)}, "
                     f"z threshold {settings.z_threshold:g}, reference "
                     f"{settings.reference_path or '(bundled)'}")
        for rule in dataclasses.fields(settings.selection):
            value = getattr(settings.selection, rule.name)
            shown = ", ".join(str(v) for v in value) if isinstance(value, tuple) else value
            lines.append(f"  {'selection.' + rule.name:<36}{shown}")
        lines.append("remote AEs:")
        for remote in self.remotes.values():
            rights = [r for r, ok in (("may send", remote.may_send), ("may receive", remote.may_receive),
                                      ("host checked", remote.check_host)) if ok]
            address = f"{remote.host}:{remote.port}" if remote.host else "(no DICOM address)"
            lines.append(f"  {remote.ae_title:<17}{address}  {', '.join(rights) or 'no rights'}")
            if remote.stow is not None:
                lines.append(f"  {'':<17}results by {remote.stow.describe()}")
        return "\n".join(lines)


_INFERENCE_FIELDS = {f.name for f in dataclasses.fields(InferenceSettings)}


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a config file; relative paths resolve against its folder.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a syntax error, an unknown section or key, or an invalid value (the
            message names the section, key and what is expected).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.optionxform = str  # keys are case-sensitive: a wrong case is a typo to report
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as error:
        raise ValueError(f"{path}: {error}") from None
    return config_from_parser(parser, path.resolve().parent, source=path)


def config_from_parser(parser: configparser.ConfigParser, base: Path, source: Path | None = None) -> NodeConfig:
    """Validate parsed sections (see :func:`load_config`)."""
    where = f"{source}: " if source else ""
    sections = {name: dict(parser.items(name)) for name in parser.sections()}
    for name, items in sections.items():
        if name.startswith(REMOTE_PREFIX) or name in PIPELINE_SECTIONS:
            continue
        if name not in KNOWN:
            known = ", ".join([*KNOWN, *PIPELINE_SECTIONS, "remote AE_TITLE"])
            raise ValueError(f"{where}unknown section [{name}]; known sections: {known}")
        unknown = set(items) - set(KNOWN[name])
        if unknown:
            raise ValueError(f"{where}unknown key(s) in [{name}]: {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(KNOWN[name])}")
    values = _Values(sections, where)
    remotes = _remotes(sections, base, where)
    extra = tuple(t.strip() for t in values.text("results", "extra_destinations").split(",") if t.strip())
    for title in extra:
        if title not in remotes:
            raise ValueError(f"{where}[results] extra_destinations names {title!r}, which has no [remote {title}] section")
        if not remotes[title].may_receive:
            raise ValueError(f"{where}[results] extra destination {title} has may_receive = no")
    outputs = dict(sections.get("outputs", {}))
    if outputs.get("reference", "").strip():
        outputs["reference"] = str(_resolve(base, outputs["reference"]))
    from node.pipeline import PipelineSettings

    try:
        pipeline = PipelineSettings.from_mapping(outputs, sections.get("selection") or None)
    except (ValueError, TypeError) as error:
        raise ValueError(f"{where}[outputs]/[selection]: {error}") from None
    threads = values.text("inference", "threads")
    model = values.text("inference", "model")
    config = NodeConfig(
        source=source,
        ae_title=_check_ae_title(values.text("node", "ae_title"), f"{where}[node] ae_title"),
        bind_address=values.text("node", "bind_address"),
        port=values.integer("node", "port", 0, 65535),
        max_associations=values.integer("node", "max_associations", 1, 1000),
        log_patient_identifiers=values.flag("node", "log_patient_identifiers"),
        shutdown_grace_s=values.number("node", "shutdown_grace_s", 0),
        association_request_timeout_s=values.number("node", "association_request_timeout_s", 0.1, 600),
        network_timeout_s=values.number("node", "network_timeout_s", 0.1, 3600),
        max_pending_connections=values.integer("node", "max_pending_connections", 1, 1000),
        spool_dir=_resolve(base, values.text("storage", "spool")),
        results_dir=_resolve(base, values.text("storage", "results")),
        database=_resolve(base, values.text("storage", "database")),
        max_instance_bytes=int(values.number("storage", "max_instance_mb", 0.001) * 2**20),
        max_instances_per_study=values.integer("storage", "max_instances_per_study", 1, 10**7),
        disk_high_water_percent=values.number("storage", "disk_high_water_percent", 1, 100),
        stability_s=values.number("series", "stability_s", 0),
        inference=_wrap(f"{where}[inference] ", InferenceSettings, values.text("inference", "method").lower(),
                        _resolve(base, model) if model else None, values.text("inference", "device"),
                        int(values.number("inference", "threads", 1)) if threads else None,
                        values.flag("inference", "tta"), values.flag("inference", "refine_surface"),
                        values.flag("inference", "cross_check"),
                        values.number("inference", "cross_check_min_dice", 0, 1)),
        job_timeout_s=values.number("inference", "job_timeout_s", 1),
        send_to_origin=values.flag("results", "send_to_origin"),
        extra_destinations=extra,
        retry=_wrap(where, RetryPolicy, values.number("retry", "first_delay_s", 0),
                    values.number("retry", "max_delay_s", 0), values.integer("retry", "max_attempts", 1, 1000)),
        images_retention_s=values.number("retention", "images_hours", 0) * 3600.0,
        results_retention_s=values.number("retention", "results_days", 0) * 86400.0,
        tls=_tls(values, base, where),
        remotes=remotes,
        pipeline=pipeline,
    )
    if config.inference.model is not None and not config.inference.model.is_file():
        raise FileNotFoundError(f"{where}[inference] model {config.inference.model} does not exist")
    return config


def default_config() -> NodeConfig:
    """The built-in defaults (no remote AE), paths relative to the current folder."""
    return config_from_parser(configparser.ConfigParser(), Path.cwd())


class _Values:
    """Typed access to section values with defaults from KNOWN and errors naming section and key."""

    def __init__(self, sections: Mapping[str, Mapping[str, str]], where: str):
        self.sections, self.where = sections, where

    def text(self, section: str, key: str) -> str:
        return self.sections.get(section, {}).get(key, KNOWN[section][key]).strip()

    def _fail(self, section: str, key: str, expected: str):
        return ValueError(f"{self.where}[{section}] {key} = {self.text(section, key)!r}: expected {expected}")

    def number(self, section: str, key: str, minimum: float, maximum: float = float("inf")) -> float:
        try:
            value = float(self.text(section, key))
        except ValueError:
            raise self._fail(section, key, "a number") from None
        if not minimum <= value <= maximum:
            raise self._fail(section, key, f"a number from {minimum:g} to {maximum:g}")
        return value

    def integer(self, section: str, key: str, minimum: int, maximum: int) -> int:
        try:
            value = int(self.text(section, key))
        except ValueError:
            raise self._fail(section, key, "a whole number") from None
        if not minimum <= value <= maximum:
            raise self._fail(section, key, f"a whole number from {minimum} to {maximum}")
        return value

    def flag(self, section: str, key: str) -> bool:
        return parse_yes_no(self.text(section, key), f"{self.where}[{section}] {key}")


def parse_yes_no(text: str, label: str) -> bool:
    """A yes/no setting (yes, true, on, 1 / no, false, off, 0; any case); ValueError naming ``label`` otherwise."""
    lowered = text.strip().lower()
    if lowered in ("yes", "true", "on", "1"):
        return True
    if lowered in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{label} = {text.strip()!r}: expected yes or no")


def _remotes(sections: Mapping[str, Mapping[str, str]], base: Path, where: str) -> dict[str, RemoteAE]:
    remotes = {}
    for name, items in sections.items():
        if not name.startswith(REMOTE_PREFIX):
            continue
        title = name[len(REMOTE_PREFIX):].strip()
        label = f"{where}[{name}]"
        unknown = set(items) - set(REMOTE_KEYS)
        if unknown:
            raise ValueError(f"{label}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(REMOTE_KEYS)}")
        stow = _stow(items, base, label)
        required = ("host", "port") if stow is None or items.get("host", "").strip() or items.get("port", "").strip() \
            else ()
        missing = [k for k in required if not items.get(k, "").strip()]
        if missing:
            raise ValueError(f"{label}: missing {', '.join(missing)}" + ("" if stow else " (or a stow_url)"))
        try:
            port = int(items["port"]) if required else 0
        except ValueError:
            raise ValueError(f"{label} port = {items['port']!r}: expected a whole number") from None

        def flag(key: str) -> bool:
            return parse_yes_no(items.get(key, REMOTE_KEYS[key]), f"{label} {key}")

        remotes[title] = _wrap(label + " ", RemoteAE, title, items.get("host", "").strip(), port, flag("may_send"),
                               flag("may_receive"), flag("check_host"), stow)
    return remotes


def _stow(items: Mapping[str, str], base: Path, label: str) -> StowSettings | None:
    """The remote's DICOMweb settings, or None when it has no stow_url (then no stow_* key may be set)."""
    given = {k: items[k].strip() for k in items if k.startswith("stow_") and items[k].strip()}
    if "stow_url" not in given:
        if given:
            raise ValueError(f"{label}: {', '.join(sorted(given))} without a stow_url")
        return None

    def path(key: str) -> Path | None:
        return _resolve(base, given[key]) if key in given else None

    try:
        timeout = float(items.get("stow_timeout_s", REMOTE_KEYS["stow_timeout_s"]))
    except ValueError:
        raise ValueError(f"{label} stow_timeout_s = {items['stow_timeout_s']!r}: expected a number") from None
    try:
        return StowSettings(given["stow_url"], given.get("stow_username"), path("stow_password_file"),
                            path("stow_token_file"), path("stow_ca_certificates"), timeout)
    except (ValueError, FileNotFoundError) as error:
        raise type(error)(f"{label} {error}") from None


def _tls(values: _Values, base: Path, where: str) -> TLSSettings:
    def path(key: str) -> Path | None:
        text = values.text("tls", key)
        return _resolve(base, text) if text else None

    return _wrap(where, TLSSettings, values.flag("tls", "enabled"), path("certificate"), path("private_key"),
                 path("ca_certificates"), values.flag("tls", "require_client_certificate"))


def _wrap(where: str, constructor, *args):
    """Call a validating constructor, prefixing its error with the file name."""
    try:
        return constructor(*args)
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None


def _resolve(base: Path, text: str) -> Path:
    path = Path(text.strip()).expanduser()
    return path if path.is_absolute() else (base / path).resolve()


def _check_ae_title(title: str, label: str) -> str:
    if not AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"{label}: AE title {title!r} must be 1-16 characters, no backslash, not only spaces")
    return title.strip()

