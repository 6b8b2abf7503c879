"""The DICOM side of lobevol: configuration, network, spool, jobs, series
selection, series-to-volume, SEG / SR / PDF writers and the command line."""

__version__ = "0.1.0"
