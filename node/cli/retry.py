"""``lobevol retry``: run a failed job again (resend its results, or analyse it again)."""
from __future__ import annotations

import argparse

from node.cli._options import add_config_option

EPILOG = """\
examples:
  lobevol retry 12 --config config.ini
      job 12 failed sending: its undelivered results are queued again (attempts reset);
      job 12 failed analysing: its frozen input is analysed again;
      job 12 skipped because nothing had changed since an earlier analysis: analysed anyway
The running node picks the job up within a second; without a running node it
waits for the next 'lobevol serve'. Follow it with: lobevol status --job 12
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "retry",
        help="retry a failed job (resend its results or analyse it again), or force a skipped one",
        description="Queue a failed job again: results that were not delivered are sent again with fresh "
                    "retry limits; a job that failed in its analysis is analysed again from its input.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("job", type=int, metavar="JOB", help="job id (see lobevol status)")
    add_config_option(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from node.config import load_config
    from node.service.jobs import JobStore

    config = load_config(args.config)
    jobs = JobStore(config.storage.database, create=False)
    print(f"job {args.job}: {jobs.retry(args.job)}")
    return 0
