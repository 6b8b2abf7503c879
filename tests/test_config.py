"""config.ini: the shipped file, clear errors for unknown or invalid settings, `lobevol config check`."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from node.cli import main
from node.config import load_config

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config.ini"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.ini"
    path.write_text(text)
    return path


def test_shipped_config_knows_the_pacs_and_resolves_paths_against_its_folder():
    config = load_config(SHIPPED)
    assert (config.node.ae_title, config.node.bind_address, config.node.port) == ("LOBEVOL", "127.0.0.1", 11112)
    pacs = config.remote("PACS")
    assert (pacs.host, pacs.port, pacs.may_send, pacs.may_receive) == ("127.0.0.1", 4242, True, True)
    assert config.results.send_to_origin and config.result_destinations("PACS")[0] == [pacs]
    assert config.storage.spool_dir == REPO / "var" / "spool" and config.storage.database.parent == REPO / "var"
    assert config.series.stability_s == 15 and config.inference.model is None and not config.tls.enabled
    assert (config.outputs.seg_type, config.outputs.write_sr, config.outputs.write_pdf) == ("binary", True, True)


def test_every_key_of_the_shipped_file_is_documented_by_a_comment():
    lines = SHIPPED.read_text().splitlines()
    for index, line in enumerate(lines):
        if "=" in line and not line.startswith("#"):
            above = lines[max(0, index - 6):index]
            assert any(text.startswith("#") for text in above), f"config.ini key without a comment nearby: {line}"


def test_every_key_of_the_settings_is_in_the_shipped_file():
    import dataclasses
    import re

    from node.config import SECTIONS, RemoteAE, StowSettings, _key

    text = SHIPPED.read_text()
    keys = [(section, _key(spec)) for section, cls in SECTIONS.items() for spec in dataclasses.fields(cls)
            if spec.metadata.get("in_file", True)]
    keys += [("remote", _key(spec)) for spec in dataclasses.fields(RemoteAE)
             if spec.metadata.get("in_file", True) and spec.name != "ae_title"]
    keys += [("remote", _key(spec)) for spec in dataclasses.fields(StowSettings)]  # keys named stow_*
    missing = [f"[{section}] {key}" for section, key in keys if not re.search(rf"^#?\s*{key}\b", text, re.M)]
    assert missing == [], f"config.ini lacks (as a key, or a commented-out default): {missing}"


@pytest.mark.parametrize("text, message", [
    ("[node]\nae_titel = X\n", r"unknown key\(s\) in \[node\]: ae_titel"),
    ("[nodes]\nport = 1\n", r"unknown section \[nodes\]"),
    ("[node]\nport = eleven\n", r"\[node\] port = 'eleven': expected a whole number"),
    ("[node]\nport = 70000\n", r"\[node\] port = '70000': expected a whole number from 0 to 65535"),
    ("[node]\nae_title = MUCH_TOO_LONG_AE_TITLE\n", "AE title .* 1-16 characters"),
    ("[node]\nlog_patient_identifiers = maybe\n", "expected yes or no"),
    ("[remote PACS]\nport = 104\n", r"\[remote PACS\]: missing host"),
    ("[remote PACS]\nhost = h\nport = 104\nmay_sned = yes\n", r"unknown key\(s\) in \[remote PACS\]: may_sned"),
    ("[remote PACS]\nhost = h\nport = 70000\n", r"\[remote PACS\] port = '70000': expected a whole number from 0 to 65535"),
    ("[remote PACS]\nhost = h\n", r"\[remote PACS\]: missing port \(or a stow_url\)"),
    ("[results]\nextra_destinations = ARCHIVE\n", r"ARCHIVE.*no \[remote ARCHIVE\] section"),
    ("[retry]\nfirst_delay_s = 60\nmax_delay_s = 10\n", "first_delay_s <= max_delay_s"),
    ("[inference]\ndevice = tpu\n", "expected auto, cpu, cuda or cuda:N"),
    ("[outputs]\nseg = fancy\n", r"\[outputs\] seg = 'fancy': expected binary, labelmap, none"),
    ("[outputs]\nseg = none\n", r"\[outputs\] the SR references the SEG"),
    ("[outputs]\ncolour = yes\n", r"unknown key\(s\) in \[outputs\]: colour"),
    ("[outputs]\npdf = maybe\n", r"\[outputs\] pdf = 'maybe': expected yes or no"),
    ("[outputs]\nz_threshold = 0\n", r"\[outputs\] z_threshold = '0': expected a number"),
    ("[inference]\nthreads = two\n", r"\[inference\] threads = 'two': expected a whole number or nothing"),
    ("[selection]\nmax_thickness = 5\n", r"unknown key\(s\) in \[selection\]: max_thickness"),
    ("[selection]\nmin_slices = ten\n", r"\[selection\] min_slices = 'ten': expected a whole number"),
    ("[selection]\nmax_slice_thickness_mm = 0\n", r"\[selection\] max_slice_thickness_mm must be positive"),
    ("[selection]\nbone_kernels = BONE(, EDGE\n", r"\[selection\] bone_kernels: 'BONE\(' is not a valid regular"),
    ("[selection]\nsoft_window_center_hu = 40\n", r"\[selection\] soft_window_center_hu = '40': expected a number, a number"),
    ("[selection]\nhead_keywords = ,\n", r"\[selection\] head_keywords is empty"),
    ("[tls]\nenabled = yes\n", r"\[tls\] is enabled but certificate is not set"),
    ("no section header\n", "File contains no section headers"),
])
def test_invalid_settings_are_refused_with_section_and_key(tmp_path, text, message):
    with pytest.raises(ValueError, match=message):
        load_config(_write(tmp_path, text))


def test_missing_model_and_missing_file_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="model .*missing.pt does not exist"):
        load_config(_write(tmp_path, "[inference]\nmodel = missing.pt\n"))
    with pytest.raises(FileNotFoundError, match="configuration file .* does not exist"):
        load_config(tmp_path / "nope.ini")


def test_config_check_prints_the_effective_settings(capsys):
    assert main(["config", "check", str(SHIPPED)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^  node.ae_title +LOBEVOL$", out, re.MULTILINE)
    assert re.search(r"^  inference.model +\(bundled model\)$", out, re.MULTILINE)
    assert re.search(r"^  outputs.seg +binary$", out, re.MULTILINE)
    assert re.search(r"^  selection.min_coverage_mm +90.0$", out, re.MULTILINE)
    assert "PACS             127.0.0.1:4242  may send, may receive" in out
    assert "configuration is valid" in out


def test_config_check_fails_with_the_reason(tmp_path, capsys):
    assert main(["config", "check", str(_write(tmp_path, "[storage]\nmax_instance_mb = -1\n"))]) == 1
    assert "[storage] max_instance_mb = '-1'" in capsys.readouterr().err


def test_a_dicomweb_destination_with_its_secret_in_a_file_never_shown(tmp_path, capsys):
    (tmp_path / "password").write_text("hunter2-not-shown\n")
    (tmp_path / "ca.pem").write_text("(a CA bundle)\n")
    path = _write(tmp_path, "[remote ARCHIVE]\nmay_receive = yes\nstow_url = https://archive.example.org/dicom-web\n"
                            "stow_username = lobevol\nstow_password_file = password\nstow_ca_certificates = ca.pem\n"
                            "stow_timeout_s = 30\n[results]\nextra_destinations = ARCHIVE\n")
    stow = load_config(path).remote("ARCHIVE").stow
    assert (stow.url, stow.username, stow.password_file, stow.timeout_s) == (
        "https://archive.example.org/dicom-web", "lobevol", tmp_path / "password", 30.0)
    assert stow.ca_certificates == tmp_path / "ca.pem"
    assert main(["config", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "ARCHIVE          (no DICOM address)  may receive" in out
    assert (f"results by STOW-RS https://archive.example.org/dicom-web (basic auth as lobevol, password from "
            f"{tmp_path / 'password'}, CAs {tmp_path / 'ca.pem'})") in out
    assert "hunter2" not in out and "hunter2" not in repr(load_config(path))


@pytest.mark.parametrize("keys, error, message", [
    ("stow_url = ftp://h/x\n", ValueError, "is not an http:// or https:// URL"),
    ("stow_url = https://user:pw@h/dicom-web\n", ValueError, "must not hold credentials"),
    ("stow_url = http://pacs.example.org/dicom-web\nstow_token_file = token\n", ValueError, "in clear; use https"),
    ("stow_url = https://h/dicom-web\nstow_username = u\n", ValueError, "needs both stow_username and stow_password_file"),
    ("stow_url = https://h/dicom-web\nstow_username = u\nstow_password_file = token\nstow_token_file = token\n",
     ValueError, "not both"),
    ("stow_url = https://h/dicom-web\nstow_token_file = missing\n", FileNotFoundError,
     r"\[remote ARCHIVE\] stow_token_file .*missing does not exist"),
    ("stow_url = http://h/dicom-web\nstow_ca_certificates = token\n", ValueError, "https:// stow_url only"),
    ("stow_url = https://h/dicom-web\nstow_timeout_s = soon\n", ValueError, "stow_timeout_s = 'soon': expected a number"),
    ("stow_token_file = token\n", ValueError, r"\[remote ARCHIVE\]: stow_token_file without a stow_url"),
    ("host = h\nstow_url = https://h/dicom-web\n", ValueError, r"\[remote ARCHIVE\]: missing port$"),
    ("stow_url = https://h/dicom-web\ncheck_host = yes\n", ValueError, "check_host needs a host"),
])
def test_invalid_dicomweb_destinations_are_refused_naming_the_key(tmp_path, keys, error, message):
    (tmp_path / "token").write_text("t0ken\n")
    with pytest.raises(error, match=message):
        load_config(_write(tmp_path, "[remote ARCHIVE]\nmay_receive = yes\n" + keys))
