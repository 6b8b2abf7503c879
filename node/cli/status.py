"""``lobevol status``: the runners, the queue and recent jobs, with their states and reasons."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol status --config config.ini
      the runners (serve, worker, orthanc) of the job store, on every machine: what each does,
      which job it holds since when, and those not running; counts per state; then the 20
      most recent jobs: id, state, age, study UID, reason
  lobevol status --config config.ini --job 12
      one job in detail: its history and every result delivery
  lobevol status --config config.ini --state failed --limit 100

Reads the job database while the node runs (or not). Studies are named by UID.
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "status",
        help="queue counts and recent jobs with their states and reasons",
        description="Show the node's job queue: how many jobs are in each state, the recent jobs with "
                    "their reasons, or one job's history and result deliveries.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_option(parser)
    parser.add_argument("--job", type=int, default=None, metavar="ID", help="show one job in detail")
    parser.add_argument("--state", action="append", default=None, metavar="STATE",
                        help="only jobs in this state (repeatable)")
    parser.add_argument("--limit", type=int, default=20, help="how many recent jobs (default 20)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.service.jobs import STATES, JobStore

    config = load_config(args.config)
    jobs = JobStore(config.storage.database, create=False)
    if args.job is not None:
        print(describe_job(jobs, args.job))
        return 0
    for state in args.state or ():
        if state not in STATES:
            raise ValueError(f"--state {state!r} is not one of {', '.join(STATES)}")
    print(describe_runners(jobs))
    counts = jobs.counts()
    print("queue: " + ", ".join(f"{state} {counts.get(state, 0)}" for state in STATES))
    recent = jobs.jobs(limit=args.limit, states=args.state)
    if not recent:
        print("no jobs yet")
        return 0
    now = time.time()
    print(f"{'job':>5}  {'state':<10} {'updated':>8}  {'inst':>5}  study / reason")
    for job in recent:
        print(f"{job.id:>5}  {job.state:<10} {_age(now - job.updated_at):>8}  {job.instances:>5}  {job.study_uid}"
              + (f"  [{job.lease_owner}]" if job.state == "processing" and job.lease_owner else ""))
        if job.reason:
            print(f"{'':>35}{job.reason}")
    return 0


def describe_runners(jobs) -> str:
    """One line per runner: name, role, host and pid, running or not, what it does, since when."""
    from node.service.runner import HEARTBEAT_S

    now, runners = jobs.workers()
    if not runners:
        return "runners: none has run on this job store yet"
    lines = [f"runners ({jobs.describe()}):"]
    for runner in runners:
        silent = now - runner.heartbeat_at
        if runner.stopped_at is not None:
            state = f"stopped {_age(now - runner.stopped_at)} ago"
        elif silent > 3 * HEARTBEAT_S:
            state = f"NOT RUNNING: no heartbeat for {_age(silent)} (killed, frozen, or its host is down)"
        else:
            state = runner.activity
            if runner.job_id is not None and runner.since is not None:
                state += f" (job {runner.job_id} for {_age(now - runner.since)})"
        lines.append(f"  {runner.name:<24} {runner.role:<8} {runner.host}:{runner.pid:<8} {state}")
    return "\n".join(lines)


def describe_job(jobs, job_id: int) -> str:
    job = jobs.get(job_id)
    lines = [f"job {job.id}: {job.state}" + (f" ({job.reason})" if job.reason else ""),
             f"  study       {job.study_uid}",
             f"  from        {job.origin_ae}",
             f"  instances   {job.instances} received, {job.ignored} ignored (not CT)",
             f"  attempts    {job.attempts}" + (f" ({job.crashes} ended by a worker crash)" if job.crashes else ""),
             *([f"  held by     {job.lease_owner} since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(job.claimed_at))}"]
               if job.state == "processing" and job.lease_owner and job.claimed_at else []),
             f"  results     {job.results_dir or '-'}" + (" (removed by retention)" if job.results_removed else "")]
    if job.summary:
        lines.append(f"  summary     {job.summary}")
    lines.append("  history:")
    lines += [f"    {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))}  {state:<10} {message}"
              for at, state, message in jobs.events(job_id)]
    deliveries = jobs.outbox(job_id)
    if deliveries:
        lines.append("  deliveries:")
        lines += [f"    {item.destination:<16} {Path(item.path).name:<16} {item.state:<8} "
                  f"attempts {item.attempts}  {item.detail}" for item in deliveries]
    return "\n".join(lines)


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.0f} h"
    return f"{seconds / 86400:.0f} d"
