"""The network service: Storage SCP, spool, job queue, worker process, outbox and SCU.

Where a C-STORE lands: :mod:`node.service.scp` (association policy, checks, answer)
writes it through :mod:`node.service.spool` (fsync, rename) and records it in
:mod:`node.service.jobs` (the SQLite queue) before answering success.
:mod:`node.service.server` runs the SCP, the stability timer, the worker
process (:mod:`node.service.worker`) and the outbox (:mod:`node.service.outbox`,
which sends with :mod:`node.service.scu`).
"""
