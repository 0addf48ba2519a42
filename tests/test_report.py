"""check_boot's reports: the JUnit XML validates against the schema CI systems read and says the
right things; the HTML page is self-contained and escapes what the guest printed."""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from pipeline.console import CommandResult
from pipeline.report import (
    BootRecord,
    Phases,
    ReportPaths,
    html_page,
    junit_xml,
    phases_from_console,
    record_from_json,
    record_to_json,
    update_reports,
    write_reports,
)

etree = pytest.importorskip("lxml.etree", reason="lxml is a test dependency: pip install -e .[test]")
XSD = Path(__file__).with_name("data") / "junit-jenkins.xsd"

NASTY = "<script>alert(1)</script> & \x07bell \ud800"


def records() -> list[BootRecord]:
    ok = CommandResult("systemctl is-system-running --wait", 0, "running", 0.4, 60)
    failed = CommandResult("curl -fsS localhost:8000/", 3, f"curl: (7) refused {NASTY}", 0.2, 60)
    hang = CommandResult("sleep 600", None, "", 60.0, 60)
    skipped = CommandResult("echo after", None, "", 0.0)
    tail = ("[    1.000000] Linux version 6.1", "Debian GNU/Linux 12 host ttyS0", "host login: ")
    return [
        BootRecord("hello", "tgz", True, 4.2, console_tail=tail, console_log="\n".join(tail) + f"\n{NASTY}",
                   phases=Phases(firmware=None, kernel=1.1, init=2.9, login=0.3), commands=(ok,)),
        BootRecord("hello", "bios", True, 6.0, console_tail=tail, phases=Phases(0.8, 1.2, 3.5, 0.4),
                   commands=(ok, failed), cached=False),
        BootRecord("hello", "uefi", True, 9.0, console_tail=tail, commands=(ok, hang, skipped)),
        BootRecord("webapp", "tgz", False, 600.0, reason="no 'login: ' on the console within 600s",
                   console_tail=("[    2.000000] Kernel panic", NASTY), commands=(ok,)),
        BootRecord("webapp", "bios", True, 5.0, cached=True, passed_by="HTTP 200 /"),
    ]


def validate(text: str, xsd: Path) -> None:
    schema = etree.XMLSchema(etree.parse(str(xsd)))
    doc = etree.fromstring(text.encode())
    assert schema.validate(doc), schema.error_log


def test_junit_validates_against_the_schema():
    validate(junit_xml(records()), XSD)
    validate(junit_xml([]), XSD)


def test_junit_content():
    root = ET.fromstring(junit_xml(records()))
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures"), root.get("errors")) == ("12", "2", "1")
    suites = {s.get("name"): s for s in root}
    assert list(suites) == ["check_boot.hello", "check_boot.webapp"]
    hello = suites["check_boot.hello"]
    names = [c.get("name") for c in hello]
    assert names == ["tgz: boot", "tgz: systemctl is-system-running --wait", "bios: boot",
                     "bios: systemctl is-system-running --wait", "bios: curl -fsS localhost:8000/", "uefi: boot",
                     "uefi: systemctl is-system-running --wait", "uefi: sleep 600", "uefi: echo after"]
    assert [hello.get(k) for k in ("tests", "failures", "errors", "skipped")] == ["9", "1", "1", "1"]
    cases = {c.get("name"): c for c in hello}
    curl = cases["bios: curl -fsS localhost:8000/"]
    assert curl.get("time") == "0.200" and curl.get("classname") == "check_boot.hello"
    failure = curl.find("failure")
    assert failure is not None and "exited with status 3" in failure.get("message")
    assert "curl: (7) refused" in failure.text and "host login:" in failure.text  # output and console tail
    assert "curl: (7) refused" in curl.find("system-out").text
    assert cases["uefi: sleep 600"].find("error").get("message") == "`sleep 600` did not finish within 60s"
    assert cases["uefi: echo after"].find("skipped") is not None
    webapp = {c.get("name"): c for c in suites["check_boot.webapp"]}
    boot = webapp["tgz: boot"].find("failure")
    assert boot.get("message") == "no 'login: ' on the console within 600s" and "Kernel panic" in boot.text
    assert webapp["tgz: systemctl is-system-running --wait"].find("skipped").get("message") == \
        "not run: the boot failed"
    assert webapp["bios: boot"].find("failure") is None


def test_html_is_self_contained_and_escaped():
    page = html_page(records())
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "src=" not in page and "href=\"http" not in page  # nothing fetched from outside
    assert page.count("<details") >= 5 and "<details open>" in page  # a failed boot's log is open
    assert "2.9" in page and "0.8" in page  # per-phase timings
    assert 'href="#hello-bios"' in page and 'id="hello-bios"' in page
    etree.fromstring(page.replace("<!DOCTYPE html>", "").encode(), etree.HTMLParser())


def test_write_reports_atomically(tmp_path):
    paths = ReportPaths.default(tmp_path / "cache")
    assert paths == ReportPaths(tmp_path / "cache/reports/check_boot.xml", tmp_path / "cache/reports/check_boot.html")
    write_reports(records(), paths)
    assert ET.parse(paths.xml).getroot().tag == "testsuites"
    assert paths.html.read_text().startswith("<!DOCTYPE html>")
    assert sorted(p.name for p in paths.xml.parent.iterdir()) == ["check_boot.html", "check_boot.xml"]
    assert ReportPaths.beside(tmp_path / "out" / "j.xml").html == tmp_path / "out" / "j.html"


def test_update_reports_merges_the_recipes(tmp_path):
    paths = ReportPaths.default(tmp_path / "cache")
    hello = [r for r in records() if r.recipe == "hello"]
    webapp = [r for r in records() if r.recipe == "webapp"]
    update_reports(paths, "hello", hello)
    update_reports(paths, "webapp", webapp)
    names = [s.get("name") for s in ET.parse(paths.xml).getroot()]
    assert names == ["check_boot.hello", "check_boot.webapp"]
    assert NASTY.split("&")[0].replace("<", "&lt;").replace(">", "&gt;") in paths.html.read_text()  # logs kept
    update_reports(paths, "hello", hello[:1], keep=["hello"])  # webapp was removed from the project
    root = ET.parse(paths.xml).getroot()
    assert [s.get("name") for s in root] == ["check_boot.hello"] and root.get("tests") == "2"
    validate(paths.xml.read_text(), XSD)


def test_record_round_trip():
    for r in records():
        back = record_from_json(record_to_json(r), cached=r.cached)
        assert back == BootRecord(r.recipe, r.mode, r.ok, round(r.seconds, 3), r.reason, r.console_tail, "",
                                  r.phases, r.commands, r.cached, r.passed_by)


def test_phases_from_console():
    lines = [(0.1, "SeaBIOS (version 1.16.2-debian-1.16.2-1)"), (1.5, "[    0.000000] Linux version 6.1.0-18-amd64"),
             (2.0, "[    0.950000] Freeing unused kernel image (initmem) memory: 2800K"),
             (2.1, "[    1.000000] Run /init as init process"), (9.0, "host login: ")]
    p = phases_from_console(lines, ready_at=9.0, login=0.4)  # init starts at the Run line, not the Freeing one
    assert (p.firmware, round(p.kernel, 3), round(p.init, 3), p.login) == (1.5, 0.6, 6.9, 0.4)
    quiet = phases_from_console([(0.2, "SeaBIOS"), (5.0, "host login: ")], ready_at=5.0)
    assert quiet == Phases(None, None, 5.0, None)
    assert phases_from_console([], ready_at=None) == Phases()
