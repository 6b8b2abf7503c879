"""Synthetic head-CT phantoms with known labels: the generator (:mod:`.generator`)
and the writer of a phantom as a DICOM CT series (:mod:`.dicom_series`)."""
