"""OUT/report.html: report.json for people. One self-contained page (inline CSS and SVG,
no script, no fetch) that reads the same offline, from a download server or a CI
artifact, with JavaScript off.

`render` is pure: a report dict in, HTML out. What it shows: the matrix (cells × formats:
each artifact's size, short sha256 and link; each cell's boot result; failures in red with
their error and log tail), a timeline of the jobs that ran (a lane per concurrent job on
each host, the critical path outlined), and each cell's clock, archive state and package
changes since the previous run. The page is not an artifact (SHA256SUMS does not list
it) and, like report.json, holds the run's times.
"""

from __future__ import annotations

import html
import json
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

import anyio

from factory.formats import FORMATS
from factory.fsutil import atomic_write, atomic_write_async

NAME = "report.html"
REPORT = "report.json"

# Bar colours by job kind (legend and timeline).
COLOURS = {
    "rootfs": "#8c6d31",
    "finalise": "#bcbd22",
    "assemble": "#1f77b4",
    "convert": "#17becf",
    "pack": "#2ca02c",
    "publish": "#9467bd",
    "boot": "#ff7f0e",
    "upload": "#7f7f7f",
}
FAILED_FILL = "#d62728"
# Jobs that did not run now have no bar: carried from an earlier run, or never started.
NOT_DRAWN = frozenset({"unchanged", "skipped"})
TAIL_LINES = 20

# Timeline geometry, px.
LABEL_W, LANE_H, BAR_H, AXIS_H = 130, 18, 14, 22
MIN_PLOT_W, MAX_PLOT_W = 1080, 3600


class ReportError(ValueError):
    """OUT/report.json cannot be made into a page; one line naming the file and the fix."""


def e(value: object) -> str:
    return html.escape(str(value), quote=True)


def human_size(size: object) -> str:
    n = _num(size)
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def seconds_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


def tick_text(seconds: float) -> str:
    return f"{int(seconds)}s" if seconds < 60 else seconds_text(seconds)


def utc(stamp: object) -> str:
    t = _num(stamp)
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def anchor(job_id: str) -> str:
    return "job-" + re.sub(r"[^A-Za-z0-9_.-]", "_", job_id)


def href(path: object) -> str | None:
    """A link to a file of OUT, relative to the page; None for anything else (an absolute
    path, `..`, a scheme): the page links only inside its folder."""
    if not isinstance(path, str) or not path:
        return None
    p = PurePosixPath(path)
    if not p.parts or p.is_absolute() or ".." in p.parts or ":" in p.parts[0]:
        return None
    return quote(p.as_posix())


def _num(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _dicts(value: object) -> list[dict[str, Any]]:
    """The records of a list in the report; anything else holds none."""
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def _jobs(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    return [j for j in _dicts(report.get("jobs")) if isinstance(j.get("id"), str)]


def ran(job: Mapping[str, Any]) -> bool:
    """A job that ran in this run, with both its times: it gets a bar."""
    return (
        job.get("status") not in NOT_DRAWN
        and _num(job.get("started")) is not None
        and _num(job.get("finished")) is not None
    )


def duration(job: Mapping[str, Any]) -> float:
    return max(0.0, (_num(job.get("finished")) or 0.0) - (_num(job.get("started")) or 0.0))


def suffix(job_id: str) -> str:
    """What a job's id says after its cell: the format (and layout) of convert, pack and
    publish jobs, the layout of assemble and boot jobs."""
    parts = job_id.split(":", 2)
    return parts[2] if len(parts) == 3 else ""


# -- the timeline --------------------------------------------------------------------


@dataclass(frozen=True)
class Bar:
    job: dict[str, Any]
    host: str
    lane: int  # within its host


def lanes(jobs: Iterable[Mapping[str, Any]]) -> list[Bar]:
    """Each job that ran on a lane of its host: greedily by start time, the first lane
    free by then, so two jobs that overlap never share one."""
    bars: list[Bar] = []
    ends: dict[str, list[float]] = {}
    order = sorted(
        (j for j in jobs if ran(j)),
        key=lambda j: (_num(j["started"]), _num(j["finished"]), j["id"]),
    )
    for job in order:
        host = str(job.get("host") or "this machine")
        start, end = _num(job["started"]) or 0.0, _num(job["finished"]) or 0.0
        free = ends.setdefault(host, [])
        for i, busy_until in enumerate(free):
            if busy_until <= start:
                free[i] = end
                bars.append(Bar(dict(job), host, i))
                break
        else:
            free.append(end)
            bars.append(Bar(dict(job), host, len(free) - 1))
    return bars


def critical_path(jobs: Iterable[Mapping[str, Any]]) -> list[str]:
    """The chain of jobs that ran, along their `deps`, that ends at the last job to finish
    and has the longest sum of actual durations: what the run's length waited on. First
    job first."""
    drawn = {j["id"]: j for j in jobs if ran(j)}
    if not drawn:
        return []
    last = max(drawn.values(), key=lambda j: (_num(j["finished"]), j["id"]))
    best: dict[str, tuple[float, list[str]]] = {}

    def chain(jid: str, seen: frozenset[str]) -> tuple[float, list[str]]:
        if jid in best:
            return best[jid]
        deps = drawn[jid].get("deps")
        deps = deps if isinstance(deps, list) else []
        options = [
            chain(d, seen | {jid})
            for d in sorted(d for d in deps if isinstance(d, str))
            if d in drawn and d not in seen
        ]
        before = max(options, key=lambda o: o[0], default=(0.0, []))
        best[jid] = (before[0] + duration(drawn[jid]), [*before[1], jid])
        return best[jid]

    return chain(last["id"], frozenset())[1]


def _tick_step(span: float, width: float) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200):
        if width * step / span >= 80:
            return float(step)
    return 14400.0


def _bar_label(job: Mapping[str, Any]) -> str:
    rest = suffix(job["id"])
    return f"{job.get('kind', '')} {rest}".strip()


def timeline(jobs: Sequence[Mapping[str, Any]]) -> str:
    bars = lanes(jobs)
    if not bars:
        return "<p class=muted>No job ran in this run (everything was carried from earlier).</p>"
    path = critical_path(jobs)
    crit = set(path)
    t0 = min(_num(b.job["started"]) or 0.0 for b in bars)
    t1 = max(_num(b.job["finished"]) or 0.0 for b in bars)
    span = max(t1 - t0, 1.0)
    plot_w = min(max(span * 1.0, MIN_PLOT_W), MAX_PLOT_W)

    def x(t: float) -> float:
        return LABEL_W + (t - t0) / span * plot_w

    hosts = list(dict.fromkeys(b.host for b in bars))
    counts = {h: 1 + max(b.lane for b in bars if b.host == h) for h in hosts}
    first_row, row = {}, 0
    for h in hosts:
        first_row[h] = row
        row += counts[h]
    height = AXIS_H + row * LANE_H + 4
    width = LABEL_W + plot_w + 40  # room for the last tick's label
    out = [
        f'<svg class=timeline width="{width:.0f}" '
        f'height="{height}" viewBox="0 0 {width:.0f} {height}" role="img" '
        f'aria-label="timeline of {len(bars)} jobs">'
    ]
    step = _tick_step(span, plot_w)
    t = 0.0
    while t <= span + 1e-9:
        px = x(t0 + t)
        out.append(
            f'<line x1="{px:.1f}" y1="{AXIS_H - 4}" x2="{px:.1f}" y2="{height}" class=grid />'
            f'<text x="{px + 2:.1f}" y="{AXIS_H - 8}" class=tick>{e(tick_text(t))}</text>'
        )
        t += step
    for h in hosts:
        for lane in range(counts[h]):
            y = AXIS_H + (first_row[h] + lane) * LANE_H
            label = f"{h} #{lane + 1}"
            out.append(f'<text x="4" y="{y + BAR_H - 3}" class=lane>{e(label)}</text>')
        y_end = AXIS_H + (first_row[h] + counts[h]) * LANE_H - 2
        out.append(f'<line x1="0" y1="{y_end}" x2="{width:.0f}" y2="{y_end}" class=sep />')
    for b in bars:
        job = b.job
        start, end = _num(job["started"]) or 0.0, _num(job["finished"]) or 0.0
        bx, bw = x(start), max(x(end) - x(start), 2.0)
        y = AXIS_H + (first_row[b.host] + b.lane) * LANE_H
        kind = str(job.get("kind", ""))
        failed = job.get("status") == "failed"
        fill = FAILED_FILL if failed else COLOURS.get(kind, "#999")
        classes = ["bar", f"k-{re.sub(r'[^a-z]', '', kind)}"]
        if job["id"] in crit:
            classes.append("crit")
        if failed:
            classes.append("failed")
        tip = (
            f"{job['id']} · {kind} · {seconds_text(duration(job))} · {b.host}"
            f" · {job.get('status')}" + (" · critical path" if job["id"] in crit else "")
        )
        out.append(
            f'<g class="{" ".join(classes)}" data-job="{e(job["id"])}">'
            f"<title>{e(tip)}</title>"
            f'<rect x="{bx:.1f}" y="{y}" width="{bw:.1f}" height="{BAR_H}" fill="{fill}" />'
        )
        label = _bar_label(job)
        if bw >= 7 * len(label) + 6:
            out.append(
                f'<text x="{bx + 3:.1f}" y="{y + BAR_H - 3}" class=barlabel>{e(label)}</text>'
            )
        out.append("</g>")
    out.append("</svg>")
    total = sum(duration(j) for j in jobs if j["id"] in crit)
    legend = " ".join(
        f'<span class=key><i style="background:{c}"></i>{e(k)}</span>' for k, c in COLOURS.items()
    )
    legend += (
        f' <span class=key><i style="background:{FAILED_FILL}"></i>failed</span>'
        " <span class=key><i class=critkey></i>critical path</span>"
    )
    return (
        f"<p class=legend>{legend}</p><div class=scroll>{''.join(out)}</div>"
        f"<p class=small>Critical path ({e(seconds_text(total))} of "
        f"{e(seconds_text(span))}): {' → '.join(e(j) for j in path)}</p>"
    )


# -- the matrix ----------------------------------------------------------------------


def _format_order(column: str) -> tuple[int, str]:
    names = list(FORMATS)
    base = column.split("-", 1)[0]
    return (names.index(base) if base in names else len(names), column)


def _cells(report: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> list[str]:
    cells = [str(c) for c in (report.get("cells") or {})]
    for j in jobs:
        if j.get("kind") != "upload" and isinstance(j.get("cell"), str):
            cells.append(j["cell"])
    for a in _dicts(report.get("artifacts")):
        if isinstance(a.get("cell"), str):
            cells.append(a["cell"])
    return list(dict.fromkeys(cells))


def _job_link(job: Mapping[str, Any]) -> str:
    return f'<a href="#{e(anchor(job["id"]))}">{e(job["id"])}</a>'


def _first_line(text: object, limit: int = 140) -> str:
    line = str(text or "").strip().splitlines()[0] if str(text or "").strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _boot_text(job: Mapping[str, Any]) -> str:
    info = job.get("info") if isinstance(job.get("info"), dict) else {}
    login = _num(info.get("login_after")) if info else None
    status = job.get("status")
    layout = suffix(job["id"])
    where = f"{e(layout)}: " if layout else ""
    if status in ("done", "unchanged") and login is not None:
        extra = f" <span class=muted>{e(info.get('firmware', ''))}</span>" if info else ""
        earlier = " <span class=muted>(earlier run)</span>" if status == "unchanged" else ""
        return f"{where}login after {e(seconds_text(login))}{extra}{earlier}"
    if status == "failed":
        return f"{where}<b>failed</b>: {e(_first_line(job.get('error')))} ({_job_link(job)})"
    return f"{where}{e(status or 'not run')}"


def matrix_table(report: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> str:
    artifacts = _dicts(report.get("artifacts"))
    by_cell_col: dict[tuple[str, str], dict[str, Any]] = {}
    column_of_path: dict[str, str] = {}
    for j in jobs:
        info = j.get("info")
        art = info.get("artifact") if isinstance(info, dict) else None
        if j.get("kind") == "publish" and isinstance(art, dict) and "path" in art:
            column_of_path[str(art["path"])] = suffix(j["id"]) or str(art.get("format"))
    for a in artifacts:
        col = column_of_path.get(str(a.get("path")), str(a.get("format", "?")))
        by_cell_col[(str(a.get("cell")), col)] = a
    by_id = {j["id"]: j for j in jobs}
    columns = {c for _, c in by_cell_col}
    columns |= {
        suffix(j["id"]) for j in jobs if j.get("kind") in ("publish", "convert", "pack")
    } - {""}
    ordered = sorted(columns, key=_format_order)
    cells = _cells(report, jobs)
    of_cell: dict[object, list[Mapping[str, Any]]] = {}
    for j in jobs:
        of_cell.setdefault(j.get("cell"), []).append(j)
    boots = [j for j in jobs if j.get("kind") == "boot"]
    uploads = [j for j in jobs if j.get("kind") == "upload"]
    head = "".join(f"<th>{e(c)}</th>" for c in ordered)
    head += "<th>boot</th>" if boots else ""
    head += "<th>upload</th>" if uploads else ""
    rows = [f"<table class=matrix><thead><tr><th>cell</th>{head}</tr></thead><tbody>"]
    for cell in cells:
        own = of_cell.get(cell, [])
        broken = [
            j
            for j in own
            if j.get("status") == "failed" and j.get("kind") in ("rootfs", "finalise", "assemble")
        ]
        th = e(cell)
        if broken:
            th += "".join(
                f"<div class=err>{_job_link(j)}: {e(_first_line(j.get('error')))}</div>"
                for j in broken
            )
        tds = []
        for col in ordered:
            art = by_cell_col.get((cell, col))
            steps = [by_id.get(f"{k}:{cell}:{col}") for k in ("convert", "pack", "publish")]
            here = [j for j in steps if j is not None]
            failed = [j for j in here if j.get("status") == "failed"]
            if failed:
                j = failed[0]
                tds.append(
                    f'<td class="bad">{_job_link(j)} <b>failed</b>'
                    f"<div class=err>{e(_first_line(j.get('error')))}</div></td>"
                )
            elif art is not None:
                link = href(art.get("path"))
                size = e(human_size(art.get("size")))
                shown = f'<a href="{e(link)}">{size}</a>' if link else size
                digest = str(art.get("sha256", ""))
                publish = by_id.get(f"publish:{cell}:{col}")
                earlier = (
                    " <span class=muted>earlier run</span>"
                    if publish is not None and publish.get("status") == "unchanged"
                    else ""
                )
                tds.append(
                    f'<td class="ok" data-artifact="{e(art.get("path", ""))}">{shown}{earlier}'
                    f'<br><code title="{e(digest)}">{e(digest[:12])}</code></td>'
                )
            elif here:
                status = here[-1].get("status") or "not run"
                tds.append(f'<td class="none">{e(status)}</td>')
            else:
                tds.append('<td class="none">—</td>')
        if boots:
            mine = [j for j in own if j.get("kind") == "boot"]
            bad = any(j.get("status") == "failed" for j in mine)
            text = "<br>".join(_boot_text(j) for j in mine) or "—"
            tds.append(f'<td class="{"bad" if bad else "boot"}">{text}</td>')
        if uploads:
            mine = [j for j in own if j.get("kind") == "upload"]
            bad = any(j.get("status") == "failed" for j in mine)
            text = "<br>".join(f"{e(suffix(j['id']))}: {e(j.get('status'))}" for j in mine) or "—"
            tds.append(f'<td class="{"bad" if bad else "boot"}">{text}</td>')
        cls = ' class="badrow"' if broken else ""
        rows.append(f"<tr{cls}><th>{th}</th>{''.join(tds)}</tr>")
    others = [j for j in uploads if j.get("cell") not in cells]
    for j in others:
        span = len(ordered) + (1 if boots else 0)
        bad = j.get("status") == "failed"
        rows.append(
            f"<tr><th>{e(j.get('cell'))}</th><td colspan={span} class=none></td>"
            f'<td class="{"bad" if bad else "boot"}">{e(suffix(j["id"]))}: '
            f"{e(j.get('status'))}</td></tr>"
        )
    rows.append("</tbody></table>")
    return "<div class=scroll>" + "".join(rows) + "</div>"


def failures(jobs: Sequence[Mapping[str, Any]]) -> str:
    failed = [j for j in jobs if j.get("status") == "failed"]
    if not failed:
        return ""
    parts = [f"<h2>Failed jobs ({len(failed)})</h2>"]
    for j in failed:
        tail = j.get("tail") if isinstance(j.get("tail"), list) else []
        log = href(j.get("log"))
        where = e(j.get("host") or "this machine")
        parts.append(
            f'<div class=failure id="{e(anchor(j["id"]))}"><h3>{e(j["id"])} '
            f"<span class=muted>{e(j.get('kind', ''))} on {where}"
            f"{', ' + e(seconds_text(duration(j))) if ran(j) else ''}</span></h3>"
            f"<pre class=error>{e(j.get('error') or '(no error recorded)')}</pre>"
        )
        if tail:
            lines = "\n".join(str(x) for x in tail[-TAIL_LINES:])
            parts.append(
                f"<p class=small>The log's last lines:</p><pre class=tail>{e(lines)}</pre>"
            )
        if log:
            parts.append(f'<p class=small>Whole log: <a href="{e(log)}">{e(j.get("log"))}</a></p>')
        parts.append("</div>")
    return "".join(parts)


# -- the changes ---------------------------------------------------------------------


def _changes_text(info: Mapping[str, Any]) -> tuple[str, str]:
    """(class, HTML) of a cell's package changes as report.json's `cells` records them."""
    if "changes" not in info:
        return "none", "not recorded (the cell was not finalised in this run)"
    ch = info["changes"]
    if ch is None:
        return "first", "first build (no earlier manifest)"
    if not isinstance(ch, dict):
        return "none", "?"
    upgraded, added, removed = (_dicts(ch.get(k)) for k in ("changed", "added", "removed"))
    if not (upgraded or added or removed):
        return "same", "no change"
    summary = f"{len(upgraded)} upgraded, {len(added)} added, {len(removed)} removed"
    items = [
        f"<li>{e(c.get('package'))} {e(c.get('old'))} → {e(c.get('new'))}</li>" for c in upgraded
    ]
    items += [f"<li>added {e(c.get('package'))} {e(c.get('version'))}</li>" for c in added]
    items += [f"<li>removed {e(c.get('package'))} {e(c.get('version'))}</li>" for c in removed]
    return (
        "moved",
        f"<details open><summary>{e(summary)}</summary><ul>{''.join(items)}</ul></details>",
    )


def changes_table(report: Mapping[str, Any]) -> str:
    cells = report.get("cells") or {}
    if not isinstance(cells, dict) or not cells:
        return "<p class=muted>No cell records in this report.</p>"
    rows = [
        "<table class=changes><thead><tr><th>cell</th><th>epoch (SOURCE_DATE_EPOCH)</th>"
        "<th>archive state</th><th>packages since the previous run</th></tr></thead><tbody>"
    ]
    for cell, info in cells.items():
        if not isinstance(info, dict):
            continue
        epoch = _num(info.get("epoch"))
        when = f"{e(utc(epoch))}<br><code>{int(epoch)}</code>" if epoch is not None else "?"
        suites = []
        for s in _dicts(info.get("archive")):
            digest = str(s.get("sha256", ""))
            suites.append(
                f"{e(s.get('suite', '?'))}: {e(s.get('date', '?'))} "
                f'<code title="{e(digest)}">{e(digest[:12])}</code>'
            )
        links = [
            f'<a href="{e(h)}">{e(label)}</a>'
            for label in ("manifest", "sbom")
            if (h := href(info.get(label))) is not None
        ]
        cls, text = _changes_text(info)
        extra = f"<div class=small>{' · '.join(links)}</div>" if links else ""
        rows.append(
            f"<tr><th>{e(cell)}{extra}</th><td>{when}</td><td>{'<br>'.join(suites) or '?'}</td>"
            f'<td class="ch-{cls}">{text}</td></tr>'
        )
    rows.append("</tbody></table>")
    return "<div class=scroll>" + "".join(rows) + "</div>"


# -- the page ------------------------------------------------------------------------

CSS = """
body{font:13px/1.35 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:12px 16px;
color:#222;background:#fff;max-width:100%}
h1{font-size:18px;margin:0 0 4px}h2{font-size:15px;margin:18px 0 6px}h3{font-size:13px;margin:4px 0}
table{border-collapse:collapse;font-size:12px}
th,td{border:1px solid #ccc;padding:3px 5px;vertical-align:top;text-align:left}
thead th{background:#f0f0f0;position:sticky;top:0}
tbody th{font-weight:600;white-space:nowrap;background:#fafafa}
code,pre{font-family:ui-monospace,"DejaVu Sans Mono",Menlo,monospace;font-size:11px}
td.ok{background:#f3faf3;white-space:nowrap}
td.bad,.failure{background:#fdecea;color:#a00;border-color:#e4a0a0}
tr.badrow th{background:#fdecea;color:#a00}
td.none{color:#888;text-align:center}
td.boot{white-space:nowrap}
.err{color:#a00;font-weight:normal;font-size:11px;white-space:normal;max-width:32em}
.muted{color:#777;font-weight:normal}.small{font-size:11px}
.status{display:inline-block;padding:1px 8px;border-radius:3px;color:#fff;font-weight:600}
.s-built,.s-unchanged{background:#2e7d32}.s-failed{background:#c62828}
.s-interrupted{background:#ef6c00}
.scroll{overflow-x:auto;max-width:100%}
.failure{border:1px solid #e4a0a0;padding:4px 8px;margin:6px 0}
pre{white-space:pre-wrap;word-break:break-all;margin:2px 0;padding:4px;background:#fff;color:#400;
border:1px solid #eee;max-height:22em;overflow:auto}
.legend .key{display:inline-block;margin-right:10px;font-size:11px}
.legend i{display:inline-block;width:12px;height:10px;margin-right:3px;vertical-align:middle}
.legend i.critkey{border:3px solid #000;width:8px;height:6px}
svg.timeline{display:block;font-size:10px}
svg .grid{stroke:#e6e6e6}svg .sep{stroke:#bbb}svg .tick,svg .lane{fill:#555}
svg .barlabel{fill:#fff;pointer-events:none}
svg .bar rect{stroke:#fff;stroke-width:.5}
svg .bar.crit rect{stroke:#000;stroke-width:3}
svg .bar:hover rect{opacity:.8}
dl.about{display:grid;grid-template-columns:max-content auto;gap:0 10px;margin:4px 0;font-size:12px}
dl.about dt{color:#666}dl.about dd{margin:0}
td.ch-moved{min-width:18em}td.ch-first,td.ch-same,td.ch-none{color:#555}
details ul{margin:2px 0;padding-left:18px;max-height:18em;overflow:auto}
"""


def _about(report: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]]) -> str:
    started, finished = _num(report.get("started")), _num(report.get("finished"))
    counts: dict[str, int] = {}
    for j in jobs:
        counts[str(j.get("status"))] = counts.get(str(j.get("status")), 0) + 1
    took = seconds_text(finished - started) if started is not None and finished is not None else "?"
    items = [
        ("started", utc(started)),
        ("finished", f"{utc(finished)} ({took})"),
        ("jobs", ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "none"),
        ("artifacts", str(len(_dicts(report.get("artifacts"))))),
        ("factory", report.get("factory_version") or "?"),
        ("built on", report.get("host") or ("several machines" if report.get("shards") else "?")),
        ("matrix sha256", str(report.get("matrix_sha256") or "?")[:16]),
    ]
    rows = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in items)
    files = " · ".join(
        f'<a href="{name}">{name}</a>' for name in ("report.json", "SHA256SUMS", "CHANGES.md")
    )
    missing = report.get("missing") if isinstance(report.get("missing"), list) else []
    note = (
        f"<p class=err>Cells no shard holds: {e(', '.join(map(str, missing)))}</p>"
        if missing
        else ""
    )
    return f"<dl class=about>{rows}<dt>files</dt><dd>{files}</dd></dl>{note}"


def render(report: Mapping[str, Any]) -> str:
    """The page for a report dict (report.json as read, or as report.write returns it)."""
    jobs = _jobs(report)
    name = str(report.get("matrix") or "factory")
    status = str(report.get("status") or "?")
    status_class = re.sub(r"[^a-z]", "", status)
    body = [
        f"<h1>{e(name)} <span class='status s-{status_class}'>{e(status)}</span></h1>",
        _about(report, jobs),
        "<h2>Matrix</h2>",
        matrix_table(report, jobs),
        failures(jobs),
        "<h2>Timeline</h2>",
        timeline(jobs),
        "<h2>Changes since the previous run</h2>",
        changes_table(report),
    ]
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        '<meta name=viewport content="width=device-width, initial-scale=1">'
        f"<title>{e(name)}: {e(status)}</title><style>{CSS}</style></head>"
        f"<body>{''.join(body)}</body></html>\n"
    )


async def write(out: Path, report: Mapping[str, Any]) -> None:
    """OUT/report.html beside report.json, atomically; rendered in a worker thread (a
    farm's thousands of jobs are a whole computation, not for the event loop)."""
    page = await anyio.to_thread.run_sync(render, report)
    await atomic_write_async(out / NAME, page)


def rebuild(out: Path) -> Path:
    """`factory report OUT`: the page again from OUT/report.json. ReportError (one line,
    naming the file and the fix) when it cannot be read or is no factory report."""
    path = out / REPORT
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ReportError(f"{path}: missing (give a factory output folder)") from None
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
        raise ReportError(f"{path}: cannot be read ({why})") from None
    try:
        report = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ReportError(
            f"{path}:{exc.lineno}: not JSON ({exc.msg}; run `factory run` again to write it)"
        ) from None
    if not isinstance(report, dict) or not isinstance(report.get("jobs"), list):
        raise ReportError(f"{path}: not a factory report (no `jobs` list; give a factory OUT)")
    try:
        page = render(report)
    except (TypeError, ValueError, KeyError, AttributeError) as exc:
        raise ReportError(
            f"{path}: a record this factory cannot read ({type(exc).__name__}: {exc}; "
            "run `factory run` again to write it)"
        ) from None
    try:
        atomic_write(out / NAME, page)
    except OSError as exc:
        raise ReportError(f"{out / NAME}: cannot write ({exc.strerror})") from None
    return out / NAME
