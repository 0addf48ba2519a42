"""check_boot's reports: JUnit XML for CI systems, and one self-contained HTML page for people.

Both are pure renderings of a list of frozen `BootRecord`s (one per recipe × mode); `write_reports`
writes them atomically. JUnit: one <testsuite> per recipe, one <testcase> per mode ("bios: boot")
and one per in-image command ("bios: systemctl is-system-running"), each with its time; a failed
boot carries its reason and the last console lines, a failed command its status and output. The
shape is the one Jenkins (xunit's junit-10.xsd) and GitLab read; tests/test_report.py validates it.
"""

from __future__ import annotations

import html
import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.console import CommandResult, Verdict
from pipeline.files import write_atomic

SUITE = "check_boot"
PHASES = ("firmware", "kernel", "init", "login")


@dataclass(frozen=True)
class Phases:
    """Where a boot's time went, in seconds, as far as the console showed it (None: not seen).
    firmware: QEMU start to the kernel's first line; kernel: to init's start; init: to the login
    prompt (or the app's check); login: the console session's login."""

    firmware: float | None = None
    kernel: float | None = None
    init: float | None = None
    login: float | None = None

    def items(self) -> tuple[tuple[str, float | None], ...]:
        return tuple((name, getattr(self, name)) for name in PHASES)


KERNEL_START = re.compile(r"^\[ *0\.0+\] |Linux version \d")  # the kernel's first console line
INIT_START = (re.compile(r"Run \S+ as init process"), re.compile(r"Freeing unused kernel.* memory"))  # first found


def phases_from_console(lines: Sequence[tuple[float, str]], *, ready_at: float | None,
                        login: float | None = None) -> Phases:
    """Phases from console lines stamped with the host's seconds since QEMU started (the check's
    reader stamps them): firmware until the kernel's first line, kernel until it runs init, init
    until `ready_at` (the login prompt or the marker). A phase the console did not show is None
    (a `quiet` kernel prints nothing, so kernel and firmware fold into init)."""
    kernel_at = next((t for t, line in lines if KERNEL_START.search(line)), None)
    init_at = next((t for pattern in INIT_START for t, line in lines if pattern.search(line)), None)
    if kernel_at is None or (init_at is not None and init_at < kernel_at):
        init_at = None
    return Phases(
        firmware=kernel_at,
        kernel=None if kernel_at is None or init_at is None else init_at - kernel_at,
        init=None if ready_at is None else ready_at - (init_at if init_at is not None else kernel_at or 0.0),
        login=login,
    )


@dataclass(frozen=True)
class BootRecord:
    """One recipe booted in one mode: whether it passed, why not, and what ran inside."""

    recipe: str
    mode: str  # a qemu.Mode value ("tgz", "bios", "uefi", …); kept as text so reports need no QEMU
    ok: bool
    seconds: float
    reason: str = ""
    console_tail: tuple[str, ...] = ()
    console_log: str = ""  # the whole console of this boot, for the HTML page ('' when cached)
    phases: Phases = Phases()
    commands: tuple[CommandResult, ...] = ()
    cached: bool = False
    passed_by: str = ""

    @property
    def passed(self) -> bool:
        """The boot and every command inside it."""
        return self.ok and all(c.ok for c in self.commands)

    @property
    def total_seconds(self) -> float:
        return self.seconds + sum(c.seconds for c in self.commands)


@dataclass(frozen=True)
class Counts:
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    time: float = 0.0

    def __add__(self, other: Counts) -> Counts:
        return Counts(self.tests + other.tests, self.failures + other.failures, self.errors + other.errors,
                      self.skipped + other.skipped, self.time + other.time)

    def attrs(self) -> dict[str, str]:
        return {"tests": str(self.tests), "failures": str(self.failures), "errors": str(self.errors),
                "skipped": str(self.skipped), "time": seconds_text(self.time)}


# ── JUnit XML ────────────────────────────────────────────────────────────────────────────────

_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def xml_text(text: str) -> str:
    """Text XML 1.0 can carry (a console can hold any byte)."""
    return _NOT_XML.sub("\ufffd", text)


def seconds_text(seconds: float) -> str:
    return f"{max(seconds, 0.0):.3f}"


def _case(parent: ET.Element, classname: str, name: str, seconds: float) -> ET.Element:
    return ET.SubElement(parent, "testcase", {"classname": classname, "name": xml_text(name),
                                              "time": seconds_text(seconds)})


def _child(parent: ET.Element, tag: str, text: str, attrs: Mapping[str, str] | None = None) -> None:
    el = ET.SubElement(parent, tag, {k: xml_text(v) for k, v in (attrs or {}).items()})
    el.text = xml_text(text)


def command_case_name(mode: str, command: str) -> str:
    first = command.strip().splitlines()[0] if command.strip() else command
    return f"{mode}: {first}" + (" …" if "\n" in command.strip() else "")


def _suite(recipe: str, records: Sequence[BootRecord]) -> tuple[ET.Element, Counts]:
    suite = ET.Element("testsuite", {"name": f"{SUITE}.{recipe}"})
    classname = f"{SUITE}.{recipe}"
    counts = Counts()
    for r in records:
        case = _case(suite, classname, f"{r.mode}: boot", r.seconds)
        tail = "\n".join(r.console_tail)
        if not r.ok:
            _child(case, "failure", tail, {"message": r.reason or "the boot check failed", "type": "boot"})
        if tail:
            _child(case, "system-out", tail)
        counts += Counts(1, 0 if r.ok else 1, 0, 0, r.seconds)
        for c in r.commands:
            verdict = c.verdict if r.ok else Verdict.NOT_RUN
            case = _case(suite, classname, command_case_name(r.mode, c.command), c.seconds)
            element = verdict.junit_element
            if element == "skipped":
                ET.SubElement(case, "skipped", {"message": "not run: the boot failed" if not r.ok
                                                else xml_text(c.reason)})
            elif element is not None:
                _child(case, element, f"$ {c.command}\n{c.output}\n\nlast console lines:\n{tail}",
                       {"message": c.reason, "type": verdict.value})
            if c.output:
                _child(case, "system-out", c.output)
            counts += Counts(1, int(element == "failure"), int(element == "error"), int(element == "skipped"),
                             c.seconds)
    suite.attrib.update(counts.attrs())
    return suite, counts


def junit_xml(records: Sequence[BootRecord], *, name: str = SUITE) -> str:
    """The JUnit XML document: <testsuites> of one <testsuite> per recipe, in the records' order."""
    root = ET.Element("testsuites", {"name": name})
    total = Counts()
    for recipe, recs in group_by_recipe(records).items():
        suite, counts = _suite(recipe, recs)
        root.append(suite)
        total += counts
    root.attrib.update({k: v for k, v in total.attrs().items() if k != "skipped"})
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"


def group_by_recipe(records: Sequence[BootRecord]) -> dict[str, list[BootRecord]]:
    out: dict[str, list[BootRecord]] = {}
    for r in records:
        out.setdefault(r.recipe, []).append(r)
    return out


# ── HTML ─────────────────────────────────────────────────────────────────────────────────────

_CSS = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.pass { background: #e6f4e6; } .fail { background: #fbe3e3; } .skip { background: #f2f2f2; }
pre { background: #111; color: #ddd; padding: .6em; overflow-x: auto; max-height: 40em; }
details { margin: .3em 0 .8em; } summary { cursor: pointer; }
"""


def _esc(text: str) -> str:
    return html.escape(xml_text(text), quote=True)


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"


def _cell_class(ok: bool | None) -> str:
    return "skip" if ok is None else "pass" if ok else "fail"


def html_page(records: Sequence[BootRecord], *, title: str = "check_boot") -> str:
    """One page, no outside resources: the matrix (recipe × mode), per-mode timings, each boot's
    commands and its console log in a collapsible block. Everything from the guest is escaped."""
    groups = group_by_recipe(records)
    modes = list(dict.fromkeys(r.mode for r in records))
    passed = sum(r.passed for r in records)
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_esc(title)}</h1>",
        f"<p>{passed} of {len(records)} boots passed.</p>",
        "<h2>Matrix</h2>", "<table><tr><th>recipe</th>" + "".join(f"<th>{_esc(m)}</th>" for m in modes) + "</tr>",
    ]
    for recipe, recs in groups.items():
        by_mode = {r.mode: r for r in recs}
        cells = []
        for m in modes:
            r = by_mode.get(m)
            if r is None:
                cells.append('<td class="skip">–</td>')
                continue
            word = "pass" if r.passed else "FAIL"
            cached = " (cached)" if r.cached else ""
            cells.append(f'<td class="{_cell_class(r.passed)}"><a href="#{_anchor(r)}">{word}</a> '
                         f"{r.total_seconds:.1f}s{cached}</td>")
        out.append(f"<tr><th>{_esc(recipe)}</th>{''.join(cells)}</tr>")
    out.append("</table>")
    out.append("<h2>Timings (seconds)</h2><table><tr><th>recipe</th><th>mode</th><th>boot</th>"
               + "".join(f"<th>{p}</th>" for p in PHASES) + "<th>commands</th><th>result</th></tr>")
    for r in records:
        phases = "".join(f'<td class="num">{_num(v)}</td>' for _, v in r.phases.items())
        commands = sum(c.seconds for c in r.commands)
        out.append(f"<tr><td>{_esc(r.recipe)}</td><td>{_esc(r.mode)}</td><td class=\"num\">{r.seconds:.1f}</td>"
                   f"{phases}<td class=\"num\">{_num(commands if r.commands else None)}</td>"
                   f'<td class="{_cell_class(r.passed)}">{"pass" if r.passed else "FAIL"}</td></tr>')
    out.append("</table>")
    out.append("<h2>Boots</h2>")
    for r in records:
        out.append(f'<h3 id="{_anchor(r)}">{_esc(r.recipe)} · {_esc(r.mode)}: '
                   f'{"pass" if r.ok else "FAIL"}{" (cached)" if r.cached else ""}</h3>')
        if r.reason or r.passed_by:
            out.append(f"<p>{_esc(r.reason or r.passed_by)}</p>")
        if r.commands:
            out.append("<table><tr><th>command</th><th>result</th><th>status</th><th>seconds</th></tr>")
            for c in r.commands:
                v = c.verdict if r.ok else Verdict.NOT_RUN
                ok = None if v is Verdict.NOT_RUN else v.ok
                status = "" if c.status is None else str(c.status)
                out.append(f"<tr><td><code>{_esc(c.command)}</code>"
                           + (f"<details><summary>output</summary><pre>{_esc(c.output)}</pre></details>"
                              if c.output else "")
                           + f'</td><td class="{_cell_class(ok)}">{_esc(v.label)}</td><td class="num">{status}</td>'
                           f'<td class="num">{c.seconds:.2f}</td></tr>')
            out.append("</table>")
        log = r.console_log or "\n".join(r.console_tail)
        if log:
            what = "console log" if r.console_log else "last console lines"
            out.append(f"<details{'' if r.ok else ' open'}><summary>{what}</summary><pre>{_esc(log)}</pre></details>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _anchor(r: BootRecord) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "-", f"{r.recipe}-{r.mode}")


# ── files ────────────────────────────────────────────────────────────────────────────────────


@dataclass(frozen=True)
class ReportPaths:
    """Where check_boot writes: cache/reports/check_boot.xml and .html by default."""

    xml: Path
    html: Path

    @classmethod
    def default(cls, cache_dir: Path) -> ReportPaths:
        return cls.beside(cache_dir / "reports" / f"{SUITE}.xml")

    @classmethod
    def beside(cls, xml: Path) -> ReportPaths:
        """--junit PATH: the HTML page goes next to it with the .html suffix."""
        return cls(xml, xml.with_suffix(".html"))


    @property
    def records_dir(self) -> Path:
        """Each recipe's last records (<recipe>.json), from which both files are rewritten."""
        return self.xml.with_name(self.xml.stem + ".d")


def update_reports(paths: ReportPaths, recipe: str, records: Sequence[BootRecord],
                   keep: Iterable[str] | None = None) -> ReportPaths:
    """check_boot:<recipe> saves its records, then rewrites both files from every recipe's saved
    records (`keep`: the project's recipes, so a removed recipe drops out). Under a lock: the
    subtasks of `doit -n N check_boot` run in parallel processes."""
    import fcntl

    paths.records_dir.mkdir(parents=True, exist_ok=True)
    with open(paths.records_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        write_atomic(paths.records_dir / f"{recipe}.json",
                     json.dumps([record_to_json(r, with_log=True) for r in records], sort_keys=True))
        wanted = None if keep is None else set(keep)
        everything: list[BootRecord] = []
        for f in sorted(paths.records_dir.glob("*.json")):
            if wanted is None or f.stem in wanted:
                everything += [record_from_json(d) for d in json.loads(f.read_text())]
        return write_reports(everything, paths)


def write_reports(records: Sequence[BootRecord], paths: ReportPaths) -> ReportPaths:
    """Both files, each written atomically (a CI job reading them sees a whole old or new one)."""
    write_atomic(paths.xml, junit_xml(records))
    write_atomic(paths.html, html_page(records))
    return paths


def record_to_json(r: BootRecord, *, with_log: bool = False) -> dict[str, Any]:
    """A record as plain data (a cached check entry's result.json; with the log for the reports)."""
    d = {"recipe": r.recipe, "mode": r.mode, "ok": r.ok, "seconds": round(r.seconds, 3), "reason": r.reason,
         "console_tail": list(r.console_tail), "phases": dict(r.phases.items()),
         "commands": [c.to_json() for c in r.commands], "passed_by": r.passed_by}
    if with_log:
        d.update(console_log=r.console_log, cached=r.cached)
    return d


def record_from_json(d: Mapping[str, Any], *, cached: bool | None = None) -> BootRecord:
    return BootRecord(d["recipe"], d["mode"], d["ok"], d["seconds"], d.get("reason", ""),
                      tuple(d.get("console_tail", ())), d.get("console_log", ""), Phases(**d.get("phases", {})),
                      tuple(CommandResult.from_json(c) for c in d.get("commands", ())),
                      d.get("cached", False) if cached is None else cached, d.get("passed_by", ""))

