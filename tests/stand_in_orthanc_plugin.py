"""The Orthanc plugin with a model-free stand-in segmenter, for tests: Orthanc's ``PythonScript`` names this file.

Orthanc's configuration names the stand-in at its top level, ``"LobevolStandIn":
"module:Class"``; this script replaces ``inference.factory.segmenter_factory``
(where the plugin gets its segmenter) with one returning it, then runs the real
plugin file unchanged: no test hook in the shipped plugin.
"""
import importlib
import json
import runpy
import sys
from pathlib import Path

import orthanc

REPOSITORY = Path(__file__).resolve().parents[1]
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
sys.path.insert(0, str(REPOSITORY))
configuration = json.loads(orthanc.GetConfiguration())
sys.path.extend(p for p in configuration.get("Lobevol", {}).get("SitePackages", []) if p not in sys.path)
module, _, name = configuration["LobevolStandIn"].partition(":")
stand_in = getattr(importlib.import_module(module), name)

import inference.factory  # noqa: E402  (after sys.path is set)

inference.factory.segmenter_factory = lambda settings: stand_in
orthanc.LogWarning(f"lobevol: results come from the test stand-in {module}:{name}, not from a model")
runpy.run_path(str(REPOSITORY / "node" / "service" / "orthanc_plugin.py"), run_name="lobevol_orthanc_plugin")
