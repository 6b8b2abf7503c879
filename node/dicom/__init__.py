"""DICOM input: reading files (:mod:`.files`), choosing the series to analyse
(:mod:`.selection`), turning it into a HU volume with its geometry (:mod:`.volume`)
and the child's sex and age (:mod:`.demographics`)."""
