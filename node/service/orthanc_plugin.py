"""lobevol inside Orthanc: the Python plugin (Debian ``orthanc-python``) that analyses each stable study in place.

Orthanc loads this file with its ``PythonScript`` option; the ``Lobevol`` section
of Orthanc's configuration says where the rest is::

    "Plugins": ["/usr/share/orthanc/plugins/libOrthancPython.so"],
    "PythonScript": "/path/to/lobevol/node/service/orthanc_plugin.py",
    "StableAge": 15,
    "Lobevol": {
        "Configuration": "/path/to/lobevol/config.ini",
        "SitePackages": ["/path/to/lobevol/.venv/lib/python3.11/site-packages"],
        "WorkerPython": "/usr/bin/python3.11"
    }

Relative paths resolve against the folder of Orthanc's configuration file.
``SitePackages`` are appended to Orthanc's ``sys.path`` (plainly: their ``.pth``
files are not run, so an editable install of another checkout cannot shadow
this one); ``WorkerPython`` (default: the interpreter Orthanc embeds,
``/usr/bin/python3.11`` on Debian) runs the worker process with the same
``sys.path``. From lobevol's config.ini only what applies inside Orthanc is
used: ``[storage]`` (job database, job inputs, results), ``[inference]``,
``[outputs]``, ``[selection]``, ``[retry]`` (storing results into Orthanc) and
``[retention]``; the network sections (``[node]``, ``[series]``, ``[results]``,
``[tls]``, ``[remote ...]``) are not used: Orthanc receives, and its
``StableAge`` replaces ``stability_s``.

How a study goes through it (the node's job queue, states and reasons):

- Orthanc's stable-study event puts the study's id on an in-memory queue and
  returns at once; the *intake* thread records a ``selected`` job in the SQLite
  queue (one transaction).
- The job runner's thread (``node/service/runner.py``, the node's) fetches the job's input through Orthanc's REST API,
  called in-process (no HTTP, no credentials): the CT series' instances, written
  under ``[storage] spool/jobs/<job>/``. A study whose every series was made by
  lobevol, or whose lobevol results were stored after its last image, ends as
  ``skipped`` with that reason (storing our results makes the study stable
  again: that event must not start a second analysis). A study without CT is
  skipped too.
- The worker process (``node/service/worker.py``: the model loaded once, a crash
  fails one job) runs the node's analysis (``node/pipeline.py``): series
  selection, segmentation, SEG, SR, PDF, key images.
- The results go to the outbox (destination ``ORTHANC``) in the transaction that
  ends the analysis, then each is stored into the source study with ``POST
  /instances``, unless an instance with its SOP Instance UID is already in
  Orthanc; failures are retried with the ``[retry]`` backoff.

After a restart (even a ``kill -9`` of Orthanc, which the worker survives only
long enough to notice and exit) a job caught in processing is analysed again and
the outbox resumes: nothing is stored twice. REST routes (behind Orthanc's own
authentication): ``GET /lobevol/jobs`` (counts, recent jobs with their states
and reasons; ``?state=failed&limit=50``), ``GET /lobevol/jobs/<id>`` (one job's
history and deliveries), ``POST /lobevol/jobs/<id>/retry``.

A configuration error never stops Orthanc: it is logged, the plugin stays idle
and its routes answer 503 with the error.
"""
from __future__ import annotations

import json
import logging
import queue
import re
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

try:
    import orthanc  # only inside Orthanc's embedded interpreter
except ImportError:
    orthanc = None

log = logging.getLogger("lobevol.orthanc")

#: The section of Orthanc's configuration this plugin reads.
SECTION = "Lobevol"
#: The outbox destination of results stored back into Orthanc.
DESTINATION = "ORTHANC"
REPOSITORY = Path(__file__).resolve().parents[2]
RETENTION_PERIOD_S = 60.0
#: The sections of lobevol's config.ini that apply inside Orthanc; the others (network) are not read.
APPLICABLE_SECTIONS = ("storage", "inference", "outputs", "selection", "retry", "retention")
#: The job database's cursor on Orthanc's change log (the last change seen at the last start).
CHANGES_CURSOR = "orthanc-changes"


class ConfigurationError(ValueError):
    """The plugin's settings are unusable; the message says which and why."""


@dataclass(frozen=True)
class PluginSettings:
    """The ``Lobevol`` section of Orthanc's configuration.

    Attributes:
        configuration: lobevol's config.ini.
        site_packages: folders appended to ``sys.path`` (lobevol's dependencies).
        worker_python: the interpreter of the worker process.
    """

    configuration: Path
    site_packages: tuple[Path, ...] = ()
    worker_python: Path = Path(sys.base_exec_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"

    KEYS = ("Configuration", "SitePackages", "WorkerPython")

    @classmethod
    def from_orthanc(cls, configuration: Mapping[str, Any], base: Path) -> "PluginSettings":
        """Read and check the section; relative paths resolve against ``base`` (Orthanc's configuration folder)."""
        section = configuration.get(SECTION)
        if not isinstance(section, Mapping):
            raise ConfigurationError(f'Orthanc\'s configuration has no "{SECTION}" section (an object) naming '
                                     f'lobevol\'s "Configuration" file')
        unknown = sorted(set(section) - set(cls.KEYS))
        if unknown:
            raise ConfigurationError(f'"{SECTION}": unknown key(s) {", ".join(unknown)}; known: {", ".join(cls.KEYS)}')

        def path(value: Any, key: str) -> Path:
            if not isinstance(value, str) or not value.strip():
                raise ConfigurationError(f'"{SECTION}" "{key}" must be a path (a non-empty string), got {value!r}')
            resolved = Path(value).expanduser()
            return resolved if resolved.is_absolute() else (base / resolved).resolve()

        if "Configuration" not in section:
            raise ConfigurationError(f'"{SECTION}" has no "Configuration" (the path of lobevol\'s config.ini)')
        settings = cls(configuration=path(section["Configuration"], "Configuration"))
        packages = section.get("SitePackages", [])
        if isinstance(packages, str):
            packages = [packages]
        if not isinstance(packages, list):
            raise ConfigurationError(f'"{SECTION}" "SitePackages" must be a list of folders, got {packages!r}')
        folders = tuple(path(p, "SitePackages") for p in packages)
        running = f"python{sys.version_info[0]}.{sys.version_info[1]}"
        for folder in folders:
            if not folder.is_dir():
                raise ConfigurationError(f'"{SECTION}" "SitePackages": {folder} is not a folder')
            built_for = re.search(r"python\d+\.\d+", str(folder))
            if built_for and built_for.group(0) != running:
                raise ConfigurationError(f'"{SECTION}" "SitePackages": {folder} is for {built_for.group(0)}, but '
                                         f'Orthanc embeds {running} (a venv of that version is needed)')
        python = path(section["WorkerPython"], "WorkerPython") if "WorkerPython" in section else settings.worker_python
        if not python.is_file():
            raise ConfigurationError(f'"{SECTION}" "WorkerPython": {python} does not exist (the worker process\'s '
                                     f'Python, the same version as Orthanc\'s: {sys.version.split()[0]})')
        if not settings.configuration.is_file():
            raise ConfigurationError(f'"{SECTION}" "Configuration": {settings.configuration} does not exist')
        return cls(settings.configuration, folders, python)


def already_analysed(series: Sequence[Mapping[str, Any]]) -> str | None:
    """Why a study need not be analysed (its series as Orthanc lists them), or None.

    Every series made by lobevol: nothing to analyse. Otherwise the node's intake
    rule (:func:`node.service.intake.nothing_new`): CT images no newer than
    lobevol's series are not new, their results are already in the study; new
    images after them start a new analysis.
    """
    from node.service.intake import nothing_new

    ours = [s for s in series if made_by_lobevol(s)]
    if not ours:
        return None
    others = [s for s in series if not made_by_lobevol(s)]
    if not others:
        return f"every series of the study ({len(ours)}) was made by lobevol: nothing to analyse"
    results_at = max(s.get("LastUpdate", "") for s in ours)
    new = sum(max(len(s.get("Instances", [])), 1) for s in others if s.get("LastUpdate", "") > results_at)
    images = sum(max(len(s.get("Instances", [])), 1) for s in others)
    return nothing_new(new, images, sum(max(len(s.get("Instances", [])), 1) for s in ours),
                       f"{len(ours)} lobevol series stored after its last image")


def made_by_lobevol(series: Mapping[str, Any]) -> bool:
    """Whether a series (as Orthanc lists it) holds lobevol's results: its Manufacturer is ours."""
    from node.results.derived import MANUFACTURER

    return str(series.get("MainDicomTags", {}).get("Manufacturer", "")).strip() == MANUFACTURER


class OrthancStudies:
    """The few Orthanc REST calls the plugin makes, in-process (``orthanc.RestApiGet``/``Post``)."""

    def __init__(self, api):
        self.api = api

    def _get(self, uri: str) -> Any:
        return json.loads(self.api.RestApiGet(uri))

    def study(self, study_id: str) -> dict:
        return self._get(f"/studies/{study_id}")

    def series(self, study_id: str) -> list[dict]:
        return self._get(f"/studies/{study_id}/series")

    def instance_file(self, instance_id: str) -> bytes:
        return self.api.RestApiGet(f"/instances/{instance_id}/file")

    def origin(self, instance_id: str) -> str:
        """The AE title that sent the instance to Orthanc, else how it came (e.g. RestApi)."""
        for name in ("RemoteAET", "Origin"):
            try:
                value = self.api.RestApiGet(f"/instances/{instance_id}/metadata/{name}").decode().strip()
            except Exception:  # absent metadata is an error answer
                continue
            if value:
                return value
        return "unknown"

    def changes(self, since: int, limit: int = 1000) -> dict:
        """Orthanc's change log after ``since``: {"Changes": [...], "Done": bool, "Last": seq}."""
        return self._get(f"/changes?since={since}&limit={limit}")

    def last_change(self) -> int:
        return int(self._get("/changes?last")["Last"])

    def parent_study(self, series_id: str) -> str:
        return self._get(f"/series/{series_id}")["ParentStudy"]

    def instance_count(self, study_id: str) -> int:
        return len(self._get(f"/studies/{study_id}/instances"))

    def instance_exists(self, sop_instance_uid: str) -> bool:
        matches = json.loads(self.api.RestApiPost("/tools/lookup", sop_instance_uid))
        return any(m.get("Type") == "Instance" for m in matches)

    def store(self, data: bytes) -> str:
        """Store one DICOM file; returns Orthanc's instance id."""
        return json.loads(self.api.RestApiPost("/instances", data))["ID"]


class OrthancTransport:
    """Results stored into Orthanc in-process (the outbox's transport for the ``ORTHANC`` destination).

    An instance whose SOP Instance UID Orthanc already holds is not stored again
    (a restart after Orthanc stored it but before the queue recorded that).
    """

    description = "this Orthanc"

    def __init__(self, studies: OrthancStudies):
        self.studies = studies

    def send(self, paths, progress=None):
        from node.service.delivery import StoreResult
        from node.service.scu import read_file_header

        results = []
        for path in paths:
            try:
                if self.studies.instance_exists(read_file_header(path).sop_instance_uid):
                    result = StoreResult(path, "sent", "already in Orthanc")
                else:
                    stored = self.studies.store(Path(path).read_bytes())
                    result = StoreResult(path, "sent", f"stored as Orthanc instance {stored}")
            except Exception as error:  # Orthanc's REST errors carry no finer type: retried with backoff
                result = StoreResult(path, "retry", f"{type(error).__name__}: {error}")
            results.append(result)
            if progress is not None:
                progress(result)
        return results


class LobevolPlugin:
    """The plugin's threads and routes on one lobevol configuration.

    Args:
        studies: REST access to Orthanc.
        config: lobevol's configuration (``node.config.NodeConfig``).
        factory: picklable callable returning the segmenter, called once in the worker process.
    """

    def __init__(self, studies: OrthancStudies, config, factory: Callable[[], object], stable_age_s: float = 60.0):
        from node.service.jobs import JobStore
        from node.service.outbox import Outbox
        from node.service.runner import JobRunner, RunnerSettings, default_name
        from node.service.spool import Spool
        from node.service.worker import Worker

        self.studies, self.config, self.stable_age_s = studies, config, stable_age_s
        self.jobs = JobStore(config.storage.database)
        self.spool = Spool(config.storage.spool_dir)
        config.storage.results_dir.mkdir(parents=True, exist_ok=True)
        self.worker = Worker(factory, config.pipeline)
        transport = OrthancTransport(studies)
        self.outbox = Outbox(config, self.jobs, transports=lambda d: transport if d == DESTINATION else None,
                             from_pacs=True, lease_s=config.storage.lease_s)
        self.runner = JobRunner(self.jobs, self.worker, RunnerSettings(
            name=default_name("orthanc"), role="orthanc", results_dir=config.storage.results_dir,
            input_dir=lambda job: self.spool.job_input(job.id), deliveries=self._deliveries,
            job_timeout_s=config.inference.job_timeout_s, from_pacs=True, housekeeping=self._housekeeping,
            lease_s=config.storage.lease_s,
            on_finished=lambda job, state: self.outbox.deliver_due(), log_prefix="lobevol: ",
            announce_level=logging.WARNING))
        self._stable: queue.Queue[str | None] = queue.Queue()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._catch_up_timer: threading.Timer | None = None
        self._next_retention = 0.0

    @property
    def worker_status(self) -> str:
        """"ready: <model>" once the worker process has loaded it, else what the runner does (loading, cannot start)."""
        return f"ready: {self.worker.description}" if self.worker.alive else self.runner.activity

    # -- Orthanc's events ---------------------------------------------------------------------

    def on_change(self, change_type, level, resource_id: str) -> None:
        """Orthanc's change callback: queue stable studies, start and stop with Orthanc. Never blocks."""
        if change_type == orthanc.ChangeType.STABLE_STUDY:
            self._stable.put(resource_id)
        elif change_type == orthanc.ChangeType.ORTHANC_STARTED:
            self.start()
        elif change_type == orthanc.ChangeType.ORTHANC_STOPPED:
            self.stop()

    def start(self) -> None:
        """The intake thread, and the job runner (it loads the model in its own thread: Orthanc is not held up)."""
        self.runner.start(load_model=False)
        thread = threading.Thread(target=self._intake_loop, name="lobevol-intake", daemon=True)
        thread.start()
        self._threads.append(thread)

    def stop(self, timeout_s: float = 30.0) -> None:
        """Checkpoint the running job (it runs again at the next start) and stop the worker."""
        self._stopping.set()
        self._stable.put(None)
        if self._catch_up_timer is not None:
            self._catch_up_timer.cancel()
        self.outbox.stop()
        self.runner.request_stop(now=True)
        for thread in self._threads:
            thread.join(timeout_s)
        self._threads.clear()
        self.runner.stop(timeout_s)

    # -- catching up: studies Orthanc received while no stable event could reach us ------------

    def _changed_since_last_start(self) -> list[str]:
        """Studies with new series in Orthanc's change log since the last start (the first start: none).

        Orthanc keeps its stability timers in memory: a study still receiving
        when Orthanc stopped (or was killed), or whose stable event was queued
        but not yet recorded, gets no stable event after a restart.
        """
        cursor, last = self.jobs.cursor(CHANGES_CURSOR), self.studies.last_change()
        studies: dict[str, None] = {}
        while cursor is not None and cursor < last:
            page = self.studies.changes(cursor)
            for change in page["Changes"]:
                if change["ChangeType"] in ("NewStudy", "StableStudy"):
                    studies[change["ID"]] = None
                elif change["ChangeType"] == "NewSeries":
                    try:
                        studies[self.studies.parent_study(change["ID"])] = None
                    except Exception:  # the series was deleted since
                        pass
            cursor = int(page["Last"])
            if page["Done"] or not page["Changes"]:
                break
        self.jobs.set_cursor(CHANGES_CURSOR, last)
        return list(studies)

    def _catch_up(self, study_ids: Sequence[str]) -> None:
        """Queue the studies whose latest job did not see their current instances."""
        from node.service.jobs import FINAL_STATES

        queued = 0
        for study_id in study_ids:
            try:
                latest = self.jobs.latest_job_of_source(study_id)
                if latest is not None and (latest.state not in FINAL_STATES or latest.instances + latest.ignored
                                           == self.studies.instance_count(study_id)):
                    continue  # in the queue, or nothing arrived since its job looked at it
                if not self.studies.study(study_id).get("IsStable", True):
                    continue  # still receiving: its stable event will come
            except Exception:  # deleted since
                continue
            self._stable.put(study_id)
            queued += 1
        if queued:
            log.warning("lobevol: %d study(ies) received while no stable event could reach the plugin: queued",
                        queued)

    # -- intake: stable studies become jobs ---------------------------------------------------

    def _intake_loop(self) -> None:
        try:
            changed = self._changed_since_last_start()
        except Exception:
            log.exception("lobevol: cannot read Orthanc's change log; studies received while stopped wait for "
                          "new images")
            changed = []
        if changed:
            # As Orthanc would have: complete once quiet for StableAge from now.
            self._catch_up_timer = threading.Timer(self.stable_age_s, self._catch_up, (changed,))
            self._catch_up_timer.daemon = True
            self._catch_up_timer.start()
        while not self._stopping.is_set():
            study_id = self._stable.get()
            if study_id is None:
                return
            try:
                self.record(study_id)
            except Exception:  # one odd study must not stop the intake
                log.exception("lobevol: cannot record stable study %s", study_id)

    def record(self, study_id: str) -> int:
        """Record a stable study as a selected job; returns the job id."""
        study = self.studies.study(study_id)
        study_uid = study["MainDicomTags"]["StudyInstanceUID"]
        instances = self.studies.series(study_id)[0]["Instances"] if study.get("Series") else []
        origin = self.studies.origin(instances[0]) if instances else "unknown"
        job_id, created = self.jobs.record_complete_study(study_uid, study_id, origin)
        if created:
            log.info("lobevol: job %d (study %s): selected, stable in Orthanc", job_id, study_uid)
        return job_id

    # -- processing: fetch, analyse, store ----------------------------------------------------

    def _housekeeping(self) -> None:
        """Before each claim (the runner's thread): fetch inputs, send results, apply retention."""
        for job_id in self.jobs.jobs_needing_input(from_pacs=True):
            self.fetch(job_id)
        self.outbox.deliver_due()
        if time.monotonic() >= self._next_retention:
            from node.service.server import apply_retention

            apply_retention(self.jobs, self.spool, self.config)
            self._next_retention = time.monotonic() + RETENTION_PERIOD_S

    def _deliveries(self, job, result_files: Sequence[str]) -> tuple[list, list[str]]:
        from node.service.jobs import Delivery
        from node.service.scu import read_file_header

        headers = [read_file_header(Path(p)) for p in result_files]
        return [Delivery(DESTINATION, str(h.path), h.sop_class_uid, h.sop_instance_uid) for h in headers], []

    def fetch(self, job_id: int) -> None:
        """Write the job's CT instances from Orthanc into its input folder, or end it (skipped, failed)."""
        from node.service.jobs import JobState

        job = self.jobs.get(job_id)
        try:
            series = self.studies.series(job.source_id)
        except Exception as error:
            self.jobs.finish_analysis(job_id, JobState.FAILED, f"the study is no longer in Orthanc ({error})", "", None, [])
            return
        reason = already_analysed(series)
        ct = [s for s in series if s["MainDicomTags"].get("Modality") == "CT" and not made_by_lobevol(s)]
        ignored = sum(len(s["Instances"]) for s in series if s not in ct)
        if reason is None and not ct:
            modalities = sorted({s["MainDicomTags"].get("Modality", "?") for s in series})
            reason = f"no CT series in the study ({len(series)} series: {', '.join(modalities)})"
        if reason is not None:
            self.jobs.record_fetched_input(job_id, 0, ignored)
            self.jobs.finish_analysis(job_id, JobState.SKIPPED, reason, "", None, [])
            log.info("lobevol: job %d (study %s): skipped, %s", job_id, job.study_uid, reason)
            return
        folder = self.spool.job_input(job_id)
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier fetch: start again
        count = 0
        try:
            for one in ct:
                target = folder / one["ID"]
                target.mkdir(parents=True)
                for instance_id in one["Instances"]:
                    _write_durably(target / f"{instance_id}.dcm", self.studies.instance_file(instance_id))
                    count += 1
        except Exception as error:  # deleted meanwhile, disk full...: the job says so; a retry fetches again
            reason = f"cannot fetch the study from Orthanc: {type(error).__name__}: {error}"
            self.jobs.finish_analysis(job_id, JobState.FAILED, reason, "", None, [])
            log.error("lobevol: job %d (study %s): failed, %s", job_id, job.study_uid, reason)
            return
        self.jobs.record_fetched_input(job_id, count, ignored)
        log.info("lobevol: job %d (study %s): %d CT instance(s) fetched from Orthanc", job_id, job.study_uid, count)

    # -- REST routes --------------------------------------------------------------------------

    def jobs_answer(self, arguments: Mapping[str, str]) -> dict:
        from node.service.jobs import STATES

        states = [s for s in arguments.get("state", "").split(",") if s]
        for state in states:
            if state not in STATES:
                raise ValueError(f"state {state!r} is not one of {', '.join(STATES)}")
        limit = int(arguments.get("limit", "20"))
        counts = self.jobs.counts()
        return {"worker": self.worker_status, "counts": {s: counts.get(s, 0) for s in STATES},
                "jobs": [_job_json(j) for j in self.jobs.jobs(limit=limit, states=states or None)]}

    def job_answer(self, job_id: int) -> dict:
        answer = _job_json(self.jobs.get(job_id))
        answer["history"] = [{"at": at, "state": state, "message": message}
                             for at, state, message in self.jobs.events(job_id)]
        answer["deliveries"] = [{"file": Path(i.path).name, "sop_instance_uid": i.sop_instance_uid,
                                 "state": i.state, "attempts": i.attempts, "detail": i.detail}
                                for i in self.jobs.outbox(job_id)]
        return answer

    def retry_answer(self, job_id: int) -> dict:
        return {"job": job_id, "retry": self.jobs.retry(job_id)}


def _job_json(job) -> dict:
    return {"id": job.id, "state": job.state, "reason": job.reason, "summary": job.summary,
            "study_uid": job.study_uid, "orthanc_study": job.source_id, "origin": job.origin_ae,
            "instances": job.instances, "ignored": job.ignored, "attempts": job.attempts,
            "created_at": job.created_at, "updated_at": job.updated_at, "finished_at": job.finished_at}


def _write_durably(path: Path, data: bytes) -> None:
    """The job's input survives a power cut once the job says it is ready (fsync before that)."""
    import os

    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())


# -- inside Orthanc ----------------------------------------------------------------------------

class _OrthancLog(logging.Handler):
    """Python logging into Orthanc's log (info shows with Orthanc's --verbose)."""

    def emit(self, record: logging.LogRecord) -> None:
        message = self.format(record)
        if record.levelno >= logging.ERROR:
            orthanc.LogError(message)
        elif record.levelno >= logging.WARNING:
            orthanc.LogWarning(message)
        else:
            orthanc.LogInfo(message)


def load_applicable_config(path: Path):
    """lobevol's configuration from only the sections that apply inside Orthanc (:data:`APPLICABLE_SECTIONS`).

    The others keep their defaults, unread: a node's [tls] files or [remote] table need not exist here.
    """
    from node.config import config_from_sections, read_sections

    sections = {name: items for name, items in read_sections(path).items() if name in APPLICABLE_SECTIONS}
    return config_from_sections(sections, path.resolve().parent, source=path)


def _send_error(output, status: int, message: str) -> None:
    body = json.dumps({"error": message})  # orthanc-python 4.0 takes a str and its length
    output.SendHttpStatus(status, body, len(body.encode()))


def _bootstrap(api) -> LobevolPlugin:
    """Settings, sys.path, lobevol's configuration and the plugin; ConfigurationError says what is wrong."""
    import multiprocessing

    base = Path(api.GetConfigurationPath() or ".")
    base = base if base.is_dir() else base.parent
    settings = PluginSettings.from_orthanc(json.loads(api.GetConfiguration()), base)
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if p != here]  # Orthanc puts node/service first: its modules are not top-level
    if str(REPOSITORY) not in sys.path:
        sys.path.insert(0, str(REPOSITORY))
    sys.path.extend(str(p) for p in settings.site_packages if str(p) not in sys.path)
    try:
        from inference.factory import segmenter_factory
    except ImportError as error:
        raise ConfigurationError(f"cannot import lobevol's dependencies ({error}): give their site-packages "
                                 f'folder in "{SECTION}" "SitePackages"') from None
    try:
        config = load_applicable_config(settings.configuration)
    except (OSError, ValueError) as error:
        raise ConfigurationError(f"lobevol configuration: {error}") from None
    multiprocessing.set_executable(str(settings.worker_python))  # sys.executable is Orthanc itself
    factory = segmenter_factory(config.inference)
    stable_age = json.loads(api.GetConfiguration()).get("StableAge", 60)
    return LobevolPlugin(OrthancStudies(api), config, factory, float(stable_age))


def _register(api) -> None:
    """Called at import inside Orthanc: the plugin, or an idle plugin whose routes report why."""
    handler = _OrthancLog()
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in ("lobevol", "node", "inference", "normative"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    try:
        plugin, problem = _bootstrap(api), None
    except Exception as error:  # whatever it is, Orthanc must start
        problem = str(error) if isinstance(error, ConfigurationError) else f"{type(error).__name__}: {error}"
        plugin = None
        log.error("lobevol: the plugin stays idle: %s", problem)
    if plugin is not None:
        api.RegisterOnChangeCallback(plugin.on_change)
        log.warning("lobevol: plugin loaded (job database %s)", plugin.config.storage.database)

    def route(answer: Callable[[Sequence[str], Mapping[str, str]], dict], methods: tuple[str, ...]):
        def callback(output, uri, **request):
            if request.get("method") not in methods:
                output.SendMethodNotAllowed(",".join(methods))
                return
            if plugin is None:
                _send_error(output, 503, f"lobevol is idle: {problem}")
                return
            try:
                body = answer(request.get("groups", ()), request.get("get", {}))
            except ValueError as error:
                _send_error(output, 404 if "there is no job" in str(error) else 409, str(error))
                return
            output.AnswerBuffer(json.dumps(body, indent=2), "application/json")
        return callback

    api.RegisterRestCallback("/lobevol/jobs", route(lambda groups, arguments: plugin.jobs_answer(arguments), ("GET",)))
    api.RegisterRestCallback("/lobevol/jobs/([0-9]+)",
                             route(lambda groups, arguments: plugin.job_answer(int(groups[0])), ("GET",)))
    api.RegisterRestCallback("/lobevol/jobs/([0-9]+)/retry",
                             route(lambda groups, arguments: plugin.retry_answer(int(groups[0])), ("POST",)))


if orthanc is not None and __name__ != "node.service.orthanc_plugin":
    _register(orthanc)
