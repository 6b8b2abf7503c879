"""DICOM over TLS: the SCP requires a client certificate signed by the configured CA."""
from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import NodeConfig, NodeSettings, RemoteAE, StorageSettings, TLSSettings
from node.service.jobs import JobStore
from node.service.scp import StorageSCP
from node.service.scu import PeerUnavailable, echo
from node.service.spool import Spool
from tests.node_peers import tool

pytestmark = pytest.mark.integration


def _openssl(*arguments: str, cwd: Path) -> None:
    subprocess.run([tool("openssl", "openssl"), *arguments], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A test CA and a certificate for 127.0.0.1 signed by it (used by both ends)."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=lobevol test CA", cwd=folder)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "node.key", "-out", "node.csr",
             "-subj", "/CN=127.0.0.1", cwd=folder)
    (folder / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "node.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "node.pem", "-days", "1", "-extfile", "san.ext", cwd=folder)
    return folder


def test_tls_association_with_certificates_and_refusal_without(tmp_path, certificates):
    tls = TLSSettings(True, certificates / "node.pem", certificates / "node.key", certificates / "ca.pem", True)
    config = NodeConfig(node=NodeSettings(port=0), tls=tls,
                        storage=StorageSettings(spool_dir=tmp_path / "spool", results_dir=tmp_path / "results",
                                                database=tmp_path / "jobs.sqlite"),
                        remotes={"PACS": RemoteAE("PACS", "127.0.0.1", 4242, True, True)})
    scp = StorageSCP(config, Spool(config.storage.spool_dir), JobStore(config.storage.database))
    scp.start()
    try:
        node = RemoteAE("LOBEVOL", "127.0.0.1", scp.port)
        assert echo(node, "PACS", tls) == 0
        with pytest.raises(PeerUnavailable):
            echo(node, "PACS", None)  # plain DICOM to a TLS port
        # TLS without a client certificate: refused during the handshake.
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(certificates / "ca.pem"))
        ae = AE(ae_title="PACS")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", scp.port, ae_title="LOBEVOL", tls_args=(context, "127.0.0.1"))
        assert not assoc.is_established
    finally:
        scp.stop()


def test_tls_settings_name_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="certificate .*nope.pem does not exist"):
        TLSSettings(True, tmp_path / "nope.pem", tmp_path / "k", tmp_path / "ca")
