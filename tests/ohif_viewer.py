"""The prebuilt OHIF Viewer served on loopback, in front of an Orthanc's DICOMweb API.

OHIF is a single-page app: its ``dist/`` (from the npm package ``@ohif/app``,
fetched by ``tests/browser/fetch-ohif.sh``) is served as static files, with an
``app-config.js`` of our own. ``/dicom-web/...`` is passed through to Orthanc (with the browser's Host, so
the URLs Orthanc writes point back here), so the browser sees one origin and
Orthanc needs no CORS headers.
"""
from __future__ import annotations

import http.server
import shutil
import threading
import urllib.error
import urllib.request
from pathlib import Path

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
OHIF_DIST = BROWSER_DIR / "ohif" / "package" / "dist"
ORTHANC_DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")

#: OHIF's DICOMweb data source, pointed at our pass-through; no study list lazy tricks.
APP_CONFIG = """\
window.config = {
  routerBasename: '/',
  extensions: [],
  modes: [],
  showStudyList: true,
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  disableConfirmationPrompts: true,
  showErrorDetails: 'always',
  defaultDataSourceName: 'orthanc',
  dataSources: [{
    namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
    sourceName: 'orthanc',
    configuration: {
      friendlyName: 'Orthanc (lobevol test)',
      name: 'orthanc',
      wadoUriRoot: '/dicom-web',
      qidoRoot: '/dicom-web',
      wadoRoot: '/dicom-web',
      qidoSupportsIncludeField: false,
      imageRendering: 'wadors',
      thumbnailRendering: 'wadors',
      enableStudyLazyLoad: true,
      supportsFuzzyMatching: false,
      supportsWildcard: true,
      dicomUploadEnabled: false,
      bulkDataURI: { enabled: true },
      omitQuotationForMultipartRequest: true,
    },
  }],
};
"""


def ohif_dist() -> Path:
    """The OHIF build; a clear error when ``fetch-ohif.sh`` has not been run."""
    if not (OHIF_DIST / "index.html").is_file():
        raise RuntimeError(
            f"OHIF Viewer build missing at {OHIF_DIST}: run tests/browser/fetch-ohif.sh "
            "(or `make browser-deps`), which unpacks the npm package @ohif/app"
        )
    return OHIF_DIST


def dicomweb_settings() -> dict:
    """Orthanc configuration that loads and enables its DICOMweb plugin at ``/dicom-web/``."""
    if not ORTHANC_DICOMWEB_PLUGIN.is_file():
        raise RuntimeError(f"{ORTHANC_DICOMWEB_PLUGIN} missing: install orthanc-dicomweb (apt-get install orthanc-dicomweb)")
    return {"Plugins": [str(ORTHANC_DICOMWEB_PLUGIN)], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}


class ViewerServer:
    """OHIF's static files plus a pass-through of ``/dicom-web`` to ``dicomweb_base`` (Orthanc's HTTP root)."""

    def __init__(self, dicomweb_base: str):
        self.dist = ohif_dist()
        self.dicomweb_base = dicomweb_base.rstrip("/")
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _handler(self):
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(server.dist), **kwargs)

            def log_message(self, *args):  # the test reports what matters; no access log on stderr
                pass

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                if path.startswith("/dicom-web/"):
                    return self._pass_through()
                if path == "/app-config.js":
                    return self._send(APP_CONFIG.encode(), "application/javascript")
                if not (server.dist / path.lstrip("/")).is_file():
                    self.path = "/index.html"  # a route of the single-page app (/viewer?...)
                return super().do_GET()

            def _pass_through(self):
                request = urllib.request.Request(server.dicomweb_base + self.path)
                # Orthanc writes absolute BulkDataURIs (an Encapsulated PDF's document) from the
                # request's Host: the browser's, so they point back here, not cross-origin to Orthanc.
                request.add_header("Host", self.headers.get("Host", ""))
                if "Accept" in self.headers:
                    request.add_header("Accept", self.headers["Accept"])
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        body, status, kind = response.read(), response.status, response.headers.get("Content-Type")
                except urllib.error.HTTPError as error:
                    body, status, kind = error.read(), error.code, error.headers.get("Content-Type")
                self._send(body, kind or "application/octet-stream", status)

            def _send(self, body: bytes, kind: str, status: int = 200):
                self.send_response(status)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def __enter__(self) -> "ViewerServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def chromium() -> str:
    """Debian's Chromium; a clear error naming the package when it is missing."""
    path = shutil.which("chromium") or (Path("/usr/bin/chromium").is_file() and "/usr/bin/chromium")
    if not path:
        raise RuntimeError("chromium not found: install it (apt-get install chromium)")
    return str(path)


def node_driver() -> tuple[str, Path]:
    """``node`` and the Playwright driver script; errors say what to install."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node not found: install Node.js 20 (apt-get install nodejs npm)")
    if not (BROWSER_DIR / "node_modules" / "playwright-core").is_dir():
        raise RuntimeError(f"playwright-core missing: run `npm ci` in {BROWSER_DIR} (or `make browser-deps`)")
    return node, BROWSER_DIR / "ohif_check.js"
