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


# ---------------------------------------------------------------- certificates that are wrong

def _sign(folder: Path, name: str, *, ca: str = "ca", days: str = "1", host: str = "127.0.0.1") -> None:
    """A key ``name``.key and a certificate ``name``.pem for ``host``, signed by ``ca`` (``days`` < 0: expired)."""
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={host}", cwd=folder)
    kind = "IP" if host[0].isdigit() else "DNS"
    (folder / f"{name}.ext").write_text(f"subjectAltName={kind}:{host}\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", days, "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def wrong_certificates(certificates) -> Path:
    """Next to the good ones: expired (our CA), signed by another CA, and for another host (our CA)."""
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "other-ca.key", "-out", "other-ca.pem",
             "-days", "1", "-subj", "/CN=another CA", cwd=certificates)
    _sign(certificates, "expired", days="-1")
    _sign(certificates, "foreign", ca="other-ca")
    _sign(certificates, "elsewhere", host="pacs.elsewhere.example")
    (certificates / "not-pem.txt").write_text("this is not a certificate\n")
    return certificates


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> list[Path]:
    from tests.output_fixtures import region_labels, write_ct_series

    return write_ct_series(tmp_path_factory.mktemp("results") / "ct", region_labels((2, 16, 16)))


@pytest.mark.parametrize("peer, reason", [
    ("expired", "certificate is not trusted: certificate has expired"),
    ("foreign", "unable to get local issuer certificate (signed by a CA not in [tls] ca_certificates)"),
    ("elsewhere", "IP address mismatch, certificate is not valid for '127.0.0.1'"),
])
def test_results_to_a_tls_pacs_with_a_wrong_certificate_fail_naming_it(tmp_path, wrong_certificates, results,
                                                                       peer, reason):
    import pydicom
    from pydicom.uid import CTImageStorage

    from node.config import RetryPolicy
    from node.service.jobs import Delivery
    from node.service.outbox import Outbox
    from tests.node_peers import free_port, wait_for

    pki = wrong_certificates
    port = free_port()
    pacs = subprocess.Popen([tool("storescp", "dcmtk"), "+tls", str(pki / f"{peer}.key"), str(pki / f"{peer}.pem"),
                             "-ic", "-aet", "PACS", "-od", str(tmp_path), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _listening(port), 10, "storescp with TLS")
        tls = TLSSettings(True, pki / "node.pem", pki / "node.key", pki / "ca.pem", True)
        config = NodeConfig(tls=tls, retry=RetryPolicy(0.05, 0.05, 1),
                            remotes={"PACS": RemoteAE("PACS", "127.0.0.1", port, True, True)})
        jobs = JobStore(tmp_path / "jobs.sqlite")
        path, _ = Spool(tmp_path / "spool").write_instance(b"x", "1.2.3", "1.2.3.4", "1.2.3.4.5")
        job_id = jobs.record_instance("1.2.3", "1.2.3.4", CTImageStorage, "1.2.3.4.5", path, 1, "PACS")
        jobs.select_stable(0)
        jobs.mark_input_ready(job_id)
        jobs.claim_next()
        deliveries = [Delivery("PACS", str(f), CTImageStorage, pydicom.dcmread(f).SOPInstanceUID) for f in results]
        jobs.finish_analysis(job_id, "done", "", "", str(tmp_path), deliveries)
        Outbox(config, jobs).deliver_due()
        job = jobs.get(job_id)
        assert job.state == "failed"
        assert reason in job.reason and "PACS at 127.0.0.1" in job.reason, job.reason
        assert "no association" not in job.reason
    finally:
        pacs.terminate()
        pacs.wait(10)


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.parametrize("files, problem", [
    (("node.pem", "expired.key", "ca.pem"), "private_key {pki}/expired.key does not match certificate {pki}/node.pem"),
    (("node.pem", "node.key", "not-pem.txt"), "ca_certificates {pki}/not-pem.txt holds no PEM certificate"),
    (("expired.pem", "expired.key", "ca.pem"), "certificate {pki}/expired.pem expired on "),
    (("not-pem.txt", "node.key", "ca.pem"), "certificate {pki}/not-pem.txt is not a PEM certificate"),
])
def test_config_check_and_serve_name_a_wrong_tls_file_in_one_line(tmp_path, wrong_certificates, files, problem):
    import sys

    pki = wrong_certificates
    certificate, key, ca = (pki / name for name in files)
    config = tmp_path / "node.ini"
    config.write_text(f"[tls]\nenabled = yes\ncertificate = {certificate}\nprivate_key = {key}\n"
                      f"ca_certificates = {ca}\n")
    expected = problem.format(pki=pki)
    for command in (["config", "check", str(config)], ["serve", "--config", str(config)]):
        run = subprocess.run([sys.executable, "-m", "node.cli", *command], capture_output=True, text=True,
                             timeout=120, cwd=Path(__file__).resolve().parents[1])
        assert run.returncode == 1, run.stdout + run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in run.stderr, run.stderr
        assert lines[0].startswith(f"lobevol {command[0]}: error: {config}: [tls] {expected}"), lines[0]


def test_lobevol_serve_fails_a_job_whose_pacs_certificate_expired_naming_it(tmp_path, wrong_certificates):
    """The real node over TLS both ways: a study in, its results refused by the PACS's expired certificate."""
    import signal

    import pydicom
    from pydicom.uid import CTImageStorage

    from node.config import load_config
    from tests.node_peers import free_port, serve, wait_for, write_node_config
    from tests.output_fixtures import region_labels, write_ct_series

    pki = wrong_certificates
    pacs_port = free_port()
    pacs = subprocess.Popen([tool("storescp", "dcmtk"), "+tls", str(pki / "expired.key"), str(pki / "expired.pem"),
                             "-ic", "-aet", "PACS", "-od", str(tmp_path), str(pacs_port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    path = write_node_config(tmp_path / "node", port=free_port(), pacs_port=pacs_port, stability_s=1,
                             extra=f"[tls]\nenabled = yes\ncertificate = {pki / 'node.pem'}\n"
                                   f"private_key = {pki / 'node.key'}\nca_certificates = {pki / 'ca.pem'}\n")
    path.write_text(path.read_text().replace("max_attempts = 30", "max_attempts = 1"))
    config = load_config(path)
    log = tmp_path / "serve.log"
    process = serve(path, log)
    try:
        series = write_ct_series(tmp_path / "ct", region_labels((24, 32, 32)), slice_spacing_mm=4.0)
        ae = AE(ae_title="PACS")
        ae.add_requested_context(CTImageStorage)
        context, host = config.tls.client_context("127.0.0.1")
        assoc = ae.associate("127.0.0.1", config.node.port, ae_title="LOBEVOL", tls_args=(context, host))
        assert assoc.is_established
        try:
            assert [int(assoc.send_c_store(pydicom.dcmread(f)).Status) for f in series] == [0] * len(series)
        finally:
            assoc.release()
        jobs = JobStore(config.storage.database)
        job = wait_for(lambda: next((j for j in jobs.jobs() if j.state in ("done", "failed", "skipped")), None), 120,
                       "the job to end")
        assert job.state == "failed", (job.state, job.reason)
        assert "certificate is not trusted: certificate has expired" in job.reason, job.reason
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-3000:]
        pacs.terminate()
        pacs.wait(10)
