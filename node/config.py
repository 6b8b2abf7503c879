"""The node's configuration: one INI file (``config.ini``), parsed once into typed settings.

Every section is a frozen dataclass and every key is one of its fields: the
field's type says how the text is read (``bool``: yes/no, ``int``, ``float``,
``Path``: resolved against the file's folder, ``X | None``: empty means
None, ``tuple[str, ...]``: comma-separated), its default is the key's default
and its :func:`setting` metadata gives the key's name in the file when it
differs from the field's, its bounds and its allowed values. :func:`load_config`
reads the file, refuses unknown sections and keys (a typo must not pass
silently), reads every value by its field's type and returns a frozen
:class:`NodeConfig` holding one object per section; ``lobevol config check``
prints its :meth:`NodeConfig.describe`. Each section's constructor validates
(bounds, cross-field rules), so settings built in code are checked too.

Sections: [node] :class:`NodeSettings`, [storage] :class:`StorageSettings`,
[series] :class:`SeriesSettings`, [selection] ``node.dicom.selection.SelectionRules``,
[inference] :class:`InferenceSettings`, [outputs] :class:`OutputSettings`,
[results] :class:`ResultsSettings`, [retry] :class:`RetryPolicy`, [retention]
:class:`RetentionSettings`, [tls] :class:`TLSSettings`, and one ``[remote NAME]``
:class:`RemoteAE` per peer, NAME being its AE title; its ``stow_*`` keys make its
:class:`StowSettings` (results by DICOMweb STOW-RS instead of C-STORE).

To add a key: add a field to its section's dataclass (type, default, and
``setting(...)`` when it needs a different name in the file, bounds or
choices), document it in config.ini above the key and, if a rule spans several
fields, check it in the dataclass's ``__post_init__``. Nothing else: parsing,
unknown-key errors and ``config check`` follow from the field. To add a
section: a frozen dataclass of such fields, one entry in :data:`SECTIONS` and a
field of :class:`NodeConfig` of the same name.
"""
from __future__ import annotations

import configparser
import dataclasses
import re
import ssl
import time
import types
import typing
import urllib.parse
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from inference.vocabulary import Method
from node.dicom.selection import SelectionRules

if TYPE_CHECKING:
    from node.pipeline import PipelineSettings

#: AE titles: 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 6.2).
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
REMOTE_PREFIX = "remote "


class SegType(str, Enum):
    """``[outputs] seg``: the DICOM SEG written (``none``: no SEG, hence no SR)."""

    BINARY = "binary"
    LABELMAP = "labelmap"
    NONE = "none"

    def __str__(self) -> str:
        return self.value


SEG_TYPES = tuple(kind.value for kind in SegType)
DEVICE = re.compile(r"auto|cpu|cuda|cuda:\d+")
#: Segmentation methods of ``[inference] method``: the network, or the template registration.
METHODS = tuple(method.value for method in Method)
#: ``[storage] database`` values naming a PostgreSQL server (a shared job store) instead of an SQLite file.
DATABASE_URL_SCHEMES = ("postgresql://", "postgres://")
#: The type of ``[storage] database``: a file path (SQLite, resolved like every path) or a PostgreSQL URL (text).
JobStoreLocation = typing.NewType("JobStoreLocation", object)
_YES, _NO = ("yes", "true", "on", "1"), ("no", "false", "off", "0")


def setting(default: Any = dataclasses.MISSING, *, key: str | None = None, low: float | None = None,
            high: float | None = None, choices: tuple[str, ...] | None = None, pattern: re.Pattern | None = None,
            expected: str | None = None, unset: str = "(none)", in_file: bool = True) -> Any:
    """A section field with what the parser needs to know about its key.

    Args:
        default: the key's default (omit for a required key).
        key: the key's name in the file when it is not the field's name.
        low, high: bounds of a number (inclusive).
        choices: the allowed words of a text.
        pattern: a regular expression a text must match whole.
        expected: how to say what is allowed, when ``pattern`` alone would not.
        unset: what ``config check`` prints for None.
        in_file: False for a field that is not a key of its own (set by code, not read from the file).
    """
    metadata = {"key": key, "low": low, "high": high, "choices": choices, "pattern": pattern,
                "expected": expected, "unset": unset, "in_file": in_file}
    return field(default=default, metadata=metadata)


def parse_flag(text: str) -> bool:
    """yes/true/on/1 or no/false/off/0 (any case); ValueError otherwise. The one yes/no parser."""
    lowered = text.strip().lower()
    if lowered in _YES:
        return True
    if lowered in _NO:
        return False
    raise ValueError(f"{text!r} is not yes or no")


def check_fields(settings: Any, section: str) -> None:
    """Bounds, choices and patterns of every field (called by each section's ``__post_init__``)."""
    for spec in dataclasses.fields(settings):
        value = getattr(settings, spec.name)
        problem = _value_problem(spec, value)
        if problem:
            raise ValueError(f"[{section}] {_key(spec)} = {value!r}: expected {problem}")


def _value_problem(spec: dataclasses.Field, value: Any) -> str | None:
    """What ``value`` should have been for this field, or None when it is fine."""
    meta = spec.metadata
    if value is None:
        return None
    low, high = meta.get("low"), meta.get("high")
    if (low is not None or high is not None) and isinstance(value, (int, float)):
        if not (low is None or value >= low) or not (high is None or value <= high):
            kind = "a whole number" if isinstance(value, int) and not isinstance(value, bool) else "a number"
            if high is None:
                return f"{kind} of at least {low:g}"
            return f"{kind} from {low:g} to {high:g}"
    if meta.get("choices") and value not in meta["choices"]:
        return meta.get("expected") or ", ".join(meta["choices"])
    if meta.get("pattern") is not None and not meta["pattern"].fullmatch(str(value)):
        return meta.get("expected") or f"text matching {meta['pattern'].pattern}"
    return None


@dataclass(frozen=True)
class NodeSettings:
    """[node]: who we are on the network and how the service behaves."""

    ae_title: str = "LOBEVOL"
    bind_address: str = "127.0.0.1"
    port: int = setting(11112, low=0, high=65535)
    max_associations: int = setting(8, low=1, high=1000)
    log_patient_identifiers: bool = False
    #: seconds a running job may finish in after a stop request before it is checkpointed.
    shutdown_grace_s: float = setting(120.0, low=0)
    #: seconds from connecting to a complete A-ASSOCIATE-RQ.
    association_request_timeout_s: float = setting(10.0, low=0.1, high=600)
    #: seconds a read or write on a connection may make no progress.
    network_timeout_s: float = setting(60.0, low=0.1, high=3600)
    #: connections still asking (not yet associated) at once, beyond max_associations.
    max_pending_connections: int = setting(32, low=1, high=1000)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, "[node] ae_title"))
        check_fields(self, "node")


@dataclass(frozen=True)
class StorageSettings:
    """[storage]: where received images, results and the job database live, and intake limits."""

    spool_dir: Path = setting(Path("var/spool"), key="spool")
    results_dir: Path = setting(Path("var/results"), key="results")
    #: the job store: an SQLite file (embedded, one machine) or ``postgresql://user@host/db`` (shared by
    #: several receivers and workers; the password belongs in ~/.pgpass or PGPASSFILE, never here).
    database: JobStoreLocation = Path("var/lobevol.sqlite")
    #: how long a runner's claim on a job (or a sender's on a delivery) lasts unless renewed (s); renewed
    #: every third of it: a runner killed, frozen or cut off loses its job to another after this long.
    lease_s: float = setting(30.0, low=0.5, high=3600)
    max_instance_mb: float = setting(200.0, low=0.001)
    max_instances_per_study: int = setting(5000, low=1, high=10**7)
    disk_high_water_percent: float = setting(90.0, low=1, high=100)

    def __post_init__(self) -> None:
        check_fields(self, "storage")
        if isinstance(self.database, str):
            from urllib.parse import urlsplit

            if not self.database.lower().startswith(DATABASE_URL_SCHEMES):
                raise ValueError(f"[storage] database = {self.database!r}: expected a file path or a postgresql:// URL")
            if urlsplit(self.database).password:
                raise ValueError("[storage] database: the URL holds a password; put it in ~/.pgpass (or the file "
                                 "PGPASSFILE names), not in the configuration")

    @property
    def max_instance_bytes(self) -> int:
        """The largest instance accepted (bytes)."""
        return int(self.max_instance_mb * 2**20)


@dataclass(frozen=True)
class SeriesSettings:
    """[series]: when a study counts as complete."""

    #: seconds without a new instance after which a study is analysed.
    stability_s: float = setting(15.0, low=0)

    def __post_init__(self) -> None:
        check_fields(self, "series")


@dataclass(frozen=True)
class InferenceSettings:
    """[inference]: what makes the regions and how it runs (``inference.factory.load_segmenter`` builds it).

    ``method`` "network" is the ResU-Net (``model``: None = bundled; ``device``, ``tta``); "atlas" the
    template registration (``device``, ``model`` and ``tta`` do not apply).
    """

    method: str = setting("network", choices=METHODS, expected=" or ".join(METHODS))
    #: run the other method too and report the per-region agreement.
    cross_check: bool = True
    #: a region's Dice between the methods below this: "methods disagree: review the regions".
    cross_check_min_dice: float = setting(0.2, low=0, high=1)
    device: str = setting("auto", pattern=DEVICE, expected="auto, cpu, cuda or cuda:N")
    threads: int | None = setting(None, low=1, high=1024, unset="(torch's choice)")
    model: Path | None = setting(None, unset="(bundled model)")
    tta: bool = True
    refine_surface: bool = True
    job_timeout_s: float = setting(1800.0, low=1)

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", self.method.strip().lower())
        check_fields(self, "inference")
        if self.model is not None and not Path(self.model).is_file():
            raise FileNotFoundError(f"[inference] model {self.model} does not exist")


@dataclass(frozen=True)
class OutputSettings:
    """[outputs]: which results to write and how volumes are compared.

    Attributes:
        seg_type: "binary" (default), "labelmap" or "none" (key ``seg``).
        write_sr: write the TID 1500 SR, which references the SEG (key ``sr``).
        write_pdf: write report.pdf and its Encapsulated PDF instance (key ``pdf``).
        write_overlays: write the Secondary Capture key images (key ``overlays``).
        reference_path: normative reference file; None = the bundled one (key ``reference``).
        z_threshold: |z| above which a volume is flagged.
        max_gap_factor: largest slice gap, in multiples of the usual spacing, accepted when
            building the volume.
    """

    seg_type: str = setting("binary", key="seg", choices=SEG_TYPES)
    write_sr: bool = setting(True, key="sr")
    write_pdf: bool = setting(True, key="pdf")
    write_overlays: bool = setting(True, key="overlays")
    reference_path: Path | None = setting(None, key="reference", unset="(bundled)")
    z_threshold: float = setting(2.0, low=1e-9)
    max_gap_factor: float = setting(2.0, low=1)

    def __post_init__(self) -> None:
        check_fields(self, "outputs")
        if self.write_sr and self.seg_type == SegType.NONE:
            raise ValueError("[outputs] the SR references the SEG's segments: enable the SEG (seg) or "
                             "disable the SR (sr = no)")


@dataclass(frozen=True)
class ResultsSettings:
    """[results]: where results are sent (AE titles of [remote ...] sections that may receive)."""

    send_to_origin: bool = True
    extra_destinations: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_fields(self, "results")


@dataclass(frozen=True)
class RetryPolicy:
    """[retry]: exponential backoff for sending results: first_delay_s, doubled each attempt up to max_delay_s.

    After ``max_attempts`` failed attempts a destination's items end as failed.
    """

    first_delay_s: float = setting(10.0, low=0)
    max_delay_s: float = setting(600.0, low=0)
    max_attempts: int = setting(8, low=1, high=1000)

    def __post_init__(self) -> None:
        if not self.first_delay_s > 0 or self.max_delay_s < self.first_delay_s:
            raise ValueError("[retry] needs 0 < first_delay_s <= max_delay_s")
        if self.max_attempts < 1:
            raise ValueError("[retry] max_attempts must be at least 1")
        check_fields(self, "retry")

    def delay_after(self, attempts: int) -> float:
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        return min(self.first_delay_s * 2 ** max(attempts - 1, 0), self.max_delay_s)


@dataclass(frozen=True)
class RetentionSettings:
    """[retention]: how long received images and results are kept."""

    images_hours: float = setting(24.0, low=0)
    results_days: float = setting(30.0, low=0)

    def __post_init__(self) -> None:
        check_fields(self, "retention")

    @property
    def images_retention_s(self) -> float:
        """Seconds the images of a finished job are kept."""
        return self.images_hours * 3600.0

    @property
    def results_retention_s(self) -> float:
        """Seconds a job's results are kept."""
        return self.results_days * 86400.0


@dataclass(frozen=True)
class TLSSettings:
    """[tls]: optional TLS for both directions (our certificate and key, the CAs we trust)."""

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
        problem = tls_files_problem(self.certificate, self.private_key, self.ca_certificates)
        if problem:
            raise ValueError(f"[tls] {problem}")

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


def tls_files_problem(certificate: Path, private_key: Path, ca_certificates: Path,
                      now: float | None = None) -> str | None:
    """What is wrong with our TLS files, naming the file, or None: checked when the configuration
    loads, so that ``config check`` and ``serve`` say it in one line instead of a handshake failing later.

    The certificate must be PEM and valid now (not expired, not yet to come), the key must be
    PEM and match it, and the CA file must hold at least one PEM certificate.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cafile=str(ca_certificates))
    except ssl.SSLError:
        return f"ca_certificates {ca_certificates} holds no PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        validity = ssl._ssl._test_decode_cert(str(certificate))  # the stdlib's only certificate reader
    except ssl.SSLError:
        return f"certificate {certificate} is not a PEM certificate (-----BEGIN CERTIFICATE-----)"
    try:
        context.load_cert_chain(str(certificate), str(private_key), password=b"")  # never prompt for one
    except ssl.SSLError as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            return f"private_key {private_key} does not match certificate {certificate}"
        return f"private_key {private_key} is not a PEM private key without a password"
    now = time.time() if now is None else now
    not_before, not_after = (ssl.cert_time_to_seconds(validity[k]) for k in ("notBefore", "notAfter"))
    if now > not_after:
        return f"certificate {certificate} expired on {validity['notAfter']}"
    if now < not_before:
        return f"certificate {certificate} is not valid before {validity['notBefore']}"
    return None


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

    url: str = setting(key="stow_url")
    username: str | None = setting(None, key="stow_username")
    password_file: Path | None = setting(None, key="stow_password_file")
    token_file: Path | None = setting(None, key="stow_token_file")
    ca_certificates: Path | None = setting(None, key="stow_ca_certificates")
    timeout_s: float = setting(60.0, key="stow_timeout_s")

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
    """[remote AE_TITLE]: a peer we know: who may send to us and who may receive our results.

    Attributes:
        ae_title: its AE title (what it sends as calling AE, what we call it); the section's name.
        host: host name or IP address.
        port: its DICOM port.
        may_send: it may open associations to us (C-STORE, C-ECHO).
        may_receive: we may send results to it.
        check_host: refuse its AE title when the association comes from another address.
        stow: results go to this DICOMweb server by STOW-RS instead of by C-STORE; host and
            port may then be left out (they are needed only for check_host and C-ECHO).
    """

    ae_title: str
    host: str = ""
    port: int = setting(0, low=0, high=65535)
    may_send: bool = False
    may_receive: bool = False
    check_host: bool = False
    stow: StowSettings | None = setting(None, in_file=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "ae_title", check_ae_title(self.ae_title, f"remote {self.ae_title!r}"))
        check_fields(self, f"remote {self.ae_title}")
        if self.stow is not None and not self.host.strip() and not self.port:
            if self.check_host:
                raise ValueError(f"[remote {self.ae_title}] check_host needs a host")
            return  # reached by DICOMweb only
        missing = [key for key, value in (("host", self.host.strip()), ("port", self.port)) if not value]
        if missing:
            raise ValueError(f"[remote {self.ae_title}]: missing {', '.join(missing)}"
                             + ("" if self.stow else " (or a stow_url)"))


#: The file's sections: name -> settings class (and field of NodeConfig).
SECTIONS: dict[str, type] = {
    "node": NodeSettings, "storage": StorageSettings, "series": SeriesSettings, "selection": SelectionRules,
    "inference": InferenceSettings, "outputs": OutputSettings, "results": ResultsSettings, "retry": RetryPolicy,
    "retention": RetentionSettings, "tls": TLSSettings,
}


@dataclass(frozen=True)
class NodeConfig:
    """Every setting of the node, one object per section (see config.ini for the meaning of each key)."""

    source: Path | None = None
    node: NodeSettings = field(default_factory=NodeSettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    series: SeriesSettings = field(default_factory=SeriesSettings)
    selection: SelectionRules = field(default_factory=SelectionRules)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    outputs: OutputSettings = field(default_factory=OutputSettings)
    results: ResultsSettings = field(default_factory=ResultsSettings)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    remotes: Mapping[str, RemoteAE] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for title in self.results.extra_destinations:
            if title not in self.remotes:
                raise ValueError(f"[results] extra_destinations names {title!r}, which has no [remote {title}] section")
            if not self.remotes[title].may_receive:
                raise ValueError(f"[results] extra destination {title} has may_receive = no")

    @property
    def pipeline(self) -> "PipelineSettings":
        """The ``node.pipeline.PipelineSettings`` of [selection] and [outputs] (what the worker analyses with)."""
        from node.pipeline import PipelineSettings  # not at import: it pulls in pydicom

        return PipelineSettings(self.selection, self.outputs)

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
        if self.results.send_to_origin and origin_ae:
            if origin_ae not in self.remotes:
                notes.append(f"origin {origin_ae} is not in the remote table")
            elif not self.remotes[origin_ae].may_receive:
                notes.append(f"origin {origin_ae} may not receive results (may_receive = no)")
            else:
                titles.append(origin_ae)
        titles += [t for t in self.results.extra_destinations if t not in titles]
        return [self.remotes[t] for t in titles], notes

    def describe(self) -> str:
        """The effective settings, ``section.key  value`` one per line (what ``lobevol config check`` prints)."""
        lines = [f"configuration: {self.source or '(built-in defaults)'}"]
        for section in SECTIONS:
            settings = getattr(self, section)
            for spec in dataclasses.fields(settings):
                lines.append(f"  {section + '.' + _key(spec):<40}{_shown(spec, getattr(settings, spec.name))}")
        lines.append("remote AEs:")
        for remote in self.remotes.values():
            rights = [r for r, ok in (("may send", remote.may_send), ("may receive", remote.may_receive),
                                      ("host checked", remote.check_host)) if ok]
            address = f"{remote.host}:{remote.port}" if remote.host else "(no DICOM address)"
            lines.append(f"  {remote.ae_title:<17}{address}  {', '.join(rights) or 'no rights'}")
            if remote.stow is not None:
                lines.append(f"  {'':<17}results by {remote.stow.describe()}")
        return "\n".join(lines)


def load_config(path: Path | str) -> NodeConfig:
    """Read and validate a config file; relative paths resolve against its folder.

    Raises:
        FileNotFoundError: the file, the model or a TLS file does not exist.
        ValueError: a syntax error, an unknown section or key, or an invalid value (the
            message names the file, section, key and what is expected).
    """
    path = Path(path)
    return config_from_sections(read_sections(path), path.resolve().parent, source=path)


def read_sections(path: Path) -> dict[str, dict[str, str]]:
    """The file's sections as text (section -> key -> value); errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"configuration file {path} does not exist")
    parser = configparser.ConfigParser(interpolation=None, default_section="__none__")
    parser.optionxform = str  # keys are case-sensitive: a wrong case is a typo to report
    try:
        parser.read(path, encoding="utf-8")
    except configparser.Error as error:
        raise ValueError(f"{path}: {error}") from None
    return {name: dict(parser.items(name)) for name in parser.sections()}


def config_from_sections(sections: Mapping[str, Mapping[str, str]], base: Path,
                         source: Path | None = None) -> NodeConfig:
    """Typed settings from sections of text values (see :func:`load_config`); ``base`` resolves paths."""
    where = f"{source}: " if source else ""
    parsed: dict[str, Any] = {}
    remotes: dict[str, RemoteAE] = {}
    for name, items in sections.items():
        if name.startswith(REMOTE_PREFIX):
            title = name[len(REMOTE_PREFIX):].strip()
            remotes[title] = _with_file(where, lambda: _remote(title, name, items, base))
        elif name in SECTIONS:
            parsed[name] = _with_file(where, lambda: parse_section(SECTIONS[name], name, items, base))
        else:
            known = ", ".join([*SECTIONS, "remote AE_TITLE"])
            raise ValueError(f"{where}unknown section [{name}]; known sections: {known}")
    return _with_file(where, lambda: NodeConfig(source=source, remotes=remotes, **parsed))


def _remote(title: str, section: str, items: Mapping[str, str], base: Path) -> RemoteAE:
    """A [remote TITLE] section: its stow_* keys make its :class:`StowSettings`, the others the AE."""
    stow_items = {k: v for k, v in items.items() if k.startswith("stow_") and v.strip()}
    stow = None
    if stow_items:
        if "stow_url" not in stow_items:
            raise ValueError(f"[{section}]: {', '.join(sorted(stow_items))} without a stow_url")
        stow = parse_section(StowSettings, section, stow_items, base)
    rest = {k: v for k, v in items.items() if not k.startswith("stow_")}
    return parse_section(RemoteAE, section, rest, base, fixed={"ae_title": title, "stow": stow},
                         also_known=[_key(spec) for spec in dataclasses.fields(StowSettings)])


def parse_section(cls: type, section: str, items: Mapping[str, str], base: Path,
                  fixed: Mapping[str, Any] | None = None, also_known: list[str] | None = None) -> Any:
    """One section's settings object from its text values, each read by its field's type.

    Args:
        cls: the section's dataclass.
        section: its name in the file (for messages).
        items: key -> text as read.
        base: folder that relative paths resolve against.
        fixed: fields not read from the file (a remote's AE title: the section's name).
        also_known: keys of the section read elsewhere (named in the unknown-key message).
    """
    fixed = dict(fixed or {})
    specs = {_key(spec): spec for spec in dataclasses.fields(cls)
             if spec.name not in fixed and spec.metadata.get("in_file", True)}
    unknown = sorted(set(items) - set(specs))
    if unknown:
        known = ", ".join([*specs, *(also_known or [])])
        raise ValueError(f"unknown key(s) in [{section}]: {', '.join(unknown)}; known: {known}")
    missing = [key for key, spec in specs.items() if _required(spec) and not items.get(key, "").strip()]
    if missing:
        raise ValueError(f"[{section}]: missing {', '.join(missing)}")
    hints = typing.get_type_hints(cls)
    values = dict(fixed)
    for key, text in items.items():
        spec = specs[key]
        try:
            value = _read(hints[spec.name], text, base)
        except ValueError:
            raise ValueError(f"[{section}] {key} = {text!r}: expected {_describe_type(hints[spec.name])}") from None
        problem = _value_problem(spec, value)
        if problem:
            raise ValueError(f"[{section}] {key} = {text!r}: expected {problem}")
        values[spec.name] = value
    try:
        return cls(**values)
    except (ValueError, FileNotFoundError) as error:
        message = str(error)
        raise type(error)(message if message.startswith("[") else f"[{section}] {message}") from None


def _read(kind: Any, text: str, base: Path) -> Any:
    """The value of type ``kind`` written as ``text`` (ValueError when it is not one)."""
    text = text.strip()
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):  # X | None: empty is None
        if not text:
            return None
        return _read(next(a for a in args if a is not type(None)), text, base)
    if typing.get_origin(kind) is tuple:
        items = [item.strip() for item in text.split(",") if item.strip()]
        if args[-1] is Ellipsis:
            return tuple(_read(args[0], item, base) for item in items)
        if len(items) != len(args):
            raise ValueError(f"{len(items)} items instead of {len(args)}")
        return tuple(_read(a, item, base) for a, item in zip(args, items))
    if kind is bool:
        return parse_flag(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is JobStoreLocation:
        return text if text.lower().startswith(DATABASE_URL_SCHEMES) else _read(Path, text, base)
    if kind is Path:
        if not text:
            raise ValueError("empty path")
        path = Path(text).expanduser()
        return path if path.is_absolute() else (base / path).resolve()
    return text


def _describe_type(kind: Any) -> str:
    args = typing.get_args(kind)
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return _describe_type(next(a for a in args if a is not type(None))) + " or nothing"
    if typing.get_origin(kind) is tuple:
        if args[-1] is Ellipsis:
            return "a comma-separated list"
        return ", ".join(_describe_type(a) for a in args)
    return {bool: "yes or no", int: "a whole number", float: "a number", Path: "a path",
            JobStoreLocation: "a file path or a postgresql:// URL"}.get(kind, "text")


def _key(spec: dataclasses.Field) -> str:
    return spec.metadata.get("key") or spec.name


def _required(spec: dataclasses.Field) -> bool:
    return spec.default is dataclasses.MISSING and spec.default_factory is dataclasses.MISSING


def _shown(spec: dataclasses.Field, value: Any) -> str:
    if value is None:
        return spec.metadata.get("unset", "(none)")
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, tuple):
        return ", ".join(str(v) for v in value) or "(none)"
    return str(value)


def _with_file(where: str, build):
    """Run a validating constructor, prefixing its error with the file name."""
    try:
        return build()
    except ValueError as error:
        raise ValueError(f"{where}{error}") from None
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{where}{error}") from None


def check_ae_title(title: str, label: str) -> str:
    """``title`` without surrounding spaces; ValueError naming ``label`` when it is not an AE title."""
    if not AE_TITLE.match(title) or not title.strip():
        raise ValueError(f"{label}: AE title {title!r} must be 1-16 characters, no backslash, not only spaces")
    return title.strip()
