"""The spool: received instances on disk, written atomically, named by validated UIDs only.

Layout under the spool folder:
  incoming/<study uid>/<series uid>/<sop instance uid>.dcm   every instance received
  jobs/<job id>/<series uid>/<sop instance uid>.dcm           a job's frozen input (hard links)

A file is complete or absent: :meth:`Spool.write_instance` writes a temporary
file, fsyncs it, renames it over the final name and fsyncs the folder (and the
parent of every folder it created), so a crash (even kill -9 or a power cut)
never leaves half an instance under a final name, nor loses an acknowledged one.
:meth:`Spool.write_file` leaves the folder fsyncs to the caller, so that the
instances of many associations share them (``node.service.committer``).
Paths are built from UIDs checked against the DICOM UID grammar (digits and
dots), never from other attributes, so no received value can name a path.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

#: Free space kept on the spool's (and the job database's) disk beyond each instance (bytes): room
#: for the database's commit (SQLite's write-ahead log grows by pages until its checkpoint), the
#: new folders and the temporary file's rename.
DISK_RESERVE_BYTES = 4 * 2**20

#: DICOM UID grammar (PS3.5 9.1): components of digits separated by dots, at most 64 characters.
UID_PATTERN = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(value: object, name: str) -> str:
    """``value`` as a UID string; ValueError naming the attribute when it is not a valid UID."""
    text = str(value or "").strip().rstrip("\0")
    if not text:
        raise ValueError(f"{name} is missing")
    if len(text) > 64 or not UID_PATTERN.match(text):
        raise ValueError(f"{name} {text[:70]!r} is not a valid UID (digits and dots, at most 64 characters)")
    return text


class Spool:
    """Received instances and job inputs under one folder (created)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.incoming = self.root / "incoming"
        self.jobs = self.root / "jobs"
        self.incoming.mkdir(parents=True, exist_ok=True)
        self.jobs.mkdir(parents=True, exist_ok=True)

    def instance_path(self, study_uid: str, series_uid: str, sop_instance_uid: str) -> Path:
        """Where an instance lives; every UID is validated first."""
        return (self.incoming / check_uid(study_uid, "Study Instance UID")
                / check_uid(series_uid, "Series Instance UID")
                / f"{check_uid(sop_instance_uid, 'SOP Instance UID')}.dcm")

    def write_instance(self, data: bytes, study_uid: str, series_uid: str, sop_instance_uid: str) -> tuple[Path, bool]:
        """Write one instance (DICOM file bytes) atomically and durably (its folders fsynced too).

        Returns:
            (path, replaced): ``replaced`` is True when an earlier copy of the same
            SOP instance was replaced (a duplicate keeps one file, the latest).
        """
        written = self.write_file(data, study_uid, series_uid, sop_instance_uid)
        sync_folders(written.folders)
        return written.path, written.replaced

    def write_file(self, data: bytes | memoryview, study_uid: str, series_uid: str,
                   sop_instance_uid: str) -> "SpooledFile":
        """Write one instance: the file's bytes fsynced, then renamed over its final name.

        The rename is durable only once :func:`sync_folders` ran on the returned
        ``folders``; until then a power cut may lose the file (never leave half of it).
        """
        path = self.instance_path(study_uid, series_uid, sop_instance_uid)
        folders = self._make_folders(path.parent)
        replaced = path.exists()
        temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # unique per writer thread
        try:
            with open(temporary, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, path)
        finally:
            if temporary.exists():
                temporary.unlink()
        return SpooledFile(path, replaced, (path.parent, *folders))

    def _make_folders(self, folder: Path) -> tuple[Path, ...]:
        """Create ``folder`` and its missing parents below the spool; returns the folders whose entries changed."""
        changed = []
        missing = [folder, *folder.parents]
        missing = missing[:missing.index(self.incoming)] if self.incoming in missing else [folder]
        for level in reversed(missing):
            if not level.is_dir():
                level.mkdir(exist_ok=True)  # another association may create it at the same time
                changed.append(level.parent)
        return tuple(changed)

    def study_folder(self, study_uid: str) -> Path:
        return self.incoming / check_uid(study_uid, "Study Instance UID")

    def freeze_job_input(self, job_id: int, paths: list[Path]) -> Path:
        """Hard-link ``paths`` into the job's input folder (rebuilt from scratch) and return it.

        Later arrivals or duplicates replace files in ``incoming`` by rename, which
        leaves these links on the instances the job was created with: a running
        job never sees a silent merge. Falls back to copying across file systems.
        """
        folder = self.job_input(job_id)
        if folder.exists():
            shutil.rmtree(folder)  # an interrupted earlier freeze: start again
        for source in paths:
            target = folder / source.parent.name / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                    raise
                shutil.copy2(source, target)
        sync_folders([folder])
        return folder

    def job_input(self, job_id: int) -> Path:
        return self.jobs / str(int(job_id))

    def remove_job_input(self, job_id: int) -> None:
        shutil.rmtree(self.job_input(job_id), ignore_errors=True)

    def remove_study(self, study_uid: str) -> None:
        shutil.rmtree(self.study_folder(study_uid), ignore_errors=True)

    def disk_used_percent(self) -> float:
        """How full the spool's file system is, in percent."""
        usage = shutil.disk_usage(self.root)
        return 100.0 * usage.used / usage.total if usage.total else 100.0

    def room_problem(self, size: int, high_water_percent: float, database: Path | None = None) -> str | None:
        """Why an instance of ``size`` bytes must not be written now (at most 64 characters: the
        C-STORE's Error Comment), or None when there is room.

        Checked before anything is written, so that a full disk is answered "out of
        resources" (the sender retries later) instead of failing half-way through a
        commit. The spool's file system must stay under ``high_water_percent`` and keep
        ``size`` plus :data:`DISK_RESERVE_BYTES` free; the database's file system (when
        it is another one) must keep the reserve free for the commit that records it.
        """
        used = self.disk_used_percent()
        if used > high_water_percent:
            return f"spool disk {used:.0f}% full, above its high-water mark ({high_water_percent:g}%)"
        needed = size + DISK_RESERVE_BYTES
        free = shutil.disk_usage(self.root).free
        if free < needed:
            return f"spool disk full: {free / 2**20:.1f} MiB free, {needed / 2**20:.1f} MiB needed"
        if database is not None and _device(database.parent) != _device(self.root):
            free = shutil.disk_usage(database.parent).free
            if free < DISK_RESERVE_BYTES:
                return f"job database disk full: {free / 2**20:.1f} MiB free, {DISK_RESERVE_BYTES / 2**20:.0f} MiB needed"
        return None


def _device(path: Path) -> int:
    return os.stat(path).st_dev


@dataclass(frozen=True)
class SpooledFile:
    """An instance written by :meth:`Spool.write_file`, not yet durable until ``folders`` are fsynced."""

    path: Path
    replaced: bool  # an earlier copy of the same SOP instance was replaced
    folders: tuple[Path, ...]  # folders whose entries changed (the rename, created sub-folders)


def sync_folders(folders: Iterable[Path]) -> None:
    """Make renames and new entries in ``folders`` durable: fsync each folder once (POSIX)."""
    for folder in dict.fromkeys(folders):
        descriptor = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
