"""The DICOM side of lobevol.

Sub-packages, one per concern:
    service: the network service (Storage SCP, spool, job queue, worker, outbox, SCU).
    dicom: DICOM input (files, series selection, series to volume, demographics).
    results: result writers (SEG, SR, PDF, key images).
    cli: the ``lobevol`` command line, one module per subcommand.
Modules:
    config: ``config.ini`` read and validated (where a config key is read).
    pipeline: the analysis of one study, shared by the node and ``lobevol segment``.
"""
