"""The one intake rule of the node and the Orthanc plugin: when a complete study starts no analysis.

A study starts an analysis when it brings CT instances that are new or changed
since its earlier analysis. It does not when what arrived is only non-CT
objects (lobevol's own SEG, SR, PDF and key images routed back by a PACS, a
report, a dose sheet) or the very instances already analysed: its results are
already in the study; sending them back or sending the study again must not
produce a second result set (a PACS that routes results back would loop).
``lobevol retry`` forces an analysis of such a study anyway.
"""
from __future__ import annotations


def nothing_new(new_ct: int, ct: int, other: int, earlier: str | None, retry: str = "") -> str | None:
    """Why a complete study starts no analysis, or None when it does.

    Args:
        new_ct: its CT instances new or changed since it was last analysed.
        ct: the CT instances an analysis would use (earlier ones included).
        other: the non-CT objects that came (lobevol's own results among them), never analysed.
        earlier: what analysed it before ("job 12", "2 lobevol series"), None when nothing did
            (or the last analysis failed): then it is analysed.
        retry: how to force an analysis anyway, for the message.
    """
    if new_ct or earlier is None or ct == 0:
        return None  # ct == 0: nothing to analyse at all; the caller's own reason (no CT) says so
    if other:
        return (f"no new CT instance, only {other} other object(s) (such as lobevol's own results sent back): "
                f"its results are already in the study ({earlier})")
    return (f"its {ct} CT instance(s) are identical to those {earlier} analysed: its results are already in the "
            "study" + (f" ({retry})" if retry else ""))
