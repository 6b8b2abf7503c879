"""Is an image instance's pixel data what its header says? Checked when it arrives, before decoding.

A C-STORE of a CT slice cut short (a broken sender, a disk error at the
source) or of a header that lies (Rows = Columns = 65535 over 128 x 128 pixels)
must be refused then, with the reason, so the sender knows to resend: accepted,
it would fail the whole study later, or make the worker allocate what the header
claims. :func:`pixel_data_problem` checks without decoding (cheap enough for
every instance received):

- native (uncompressed) data: its length against Rows x Columns x Samples per
  Pixel x Bits Allocated / 8 x Number of Frames;
- encapsulated (compressed) data: the items parse (Basic Offset Table, then
  fragments: item tags, lengths that end inside the data) and there is at
  least one fragment per frame;
- the image size: at most :data:`MAX_IMAGE_SIDE` per side and
  :data:`MAX_VOXELS` pixels over all frames, the same bound the volume builder
  (``node.dicom.volume``) applies to a whole series.
"""
from __future__ import annotations

import struct

import pydicom

#: Largest number of voxels (pixels over every slice) we read or build: 2**29, 2 GiB as float32 HU.
#: A 2,000-slice 512 x 512 thin-slice head CT (524 M) fits; the 65535 x 65535 header of a fault test does not.
MAX_VOXELS = 2**29
#: Largest Rows or Columns of an image we take (CT is 512 or 1024; 4096 for micro-CT).
MAX_IMAGE_SIDE = 8192


def pixel_data_problem(ds: pydicom.Dataset) -> str | None:
    """Why the pixel data of an image instance cannot be right, or None.

    Args:
        ds: the dataset, with its transfer syntax in ``ds.file_meta`` or
            ``ds.original_encoding`` (as pynetdicom gives it).
    """
    if "PixelData" not in ds:
        return "no pixel data"
    try:
        rows, columns = int(ds.Rows), int(ds.Columns)
        frames = int(ds.get("NumberOfFrames") or 1)
        samples = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.BitsAllocated)
    except (AttributeError, TypeError, ValueError):
        return "Rows, Columns or Bits Allocated missing or not a number"
    if not (1 <= rows <= MAX_IMAGE_SIDE and 1 <= columns <= MAX_IMAGE_SIDE):
        return f"image of {rows} x {columns} pixels (at most {MAX_IMAGE_SIDE} per side)"
    if not 1 <= frames or rows * columns * frames > MAX_VOXELS:
        return f"{frames} frame(s) of {rows} x {columns}: more than {MAX_VOXELS} pixels"
    data = ds["PixelData"]
    if not data.is_undefined_length:
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if len(ds.PixelData) < expected:
            return (f"pixel data of {len(ds.PixelData)} bytes, short of the {expected} of "
                    f"{rows} x {columns} x {samples} sample(s) x {bits} bits x {frames} frame(s)")
        return None
    try:
        fragments = _count_fragments(bytes(ds.PixelData))
    except ValueError as error:
        return f"encapsulated pixel data whose fragments do not parse: {error}"
    if fragments < frames:
        return f"encapsulated pixel data with {fragments} fragment(s) for {frames} frame(s)"
    return None


_ITEM, _SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD


def _count_fragments(data: bytes) -> int:
    """Fragments after the Basic Offset Table; ValueError saying where the items stop making sense."""
    offset, items = 0, 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHL", data, offset)
        tag = group << 16 | element
        if tag == _SEQUENCE_DELIMITER:
            return max(items - 1, 0)
        if tag != _ITEM:
            raise ValueError(f"tag ({group:04X},{element:04X}) at byte {offset}, not an item")
        if length == 0xFFFFFFFF or offset + 8 + length > len(data):
            raise ValueError(f"item at byte {offset} of {length} bytes runs past the end ({len(data)} bytes)")
        offset, items = offset + 8 + length, items + 1
    if offset != len(data):
        raise ValueError(f"{len(data) - offset} byte(s) after the last item")
    if items == 0:
        raise ValueError("no Basic Offset Table item")
    return items - 1
