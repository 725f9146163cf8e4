"""The report: per variant, every metric's mean (95% interval) or rate (Wilson 95% interval), the paired difference
to its baseline on the same cases (mean per-case difference, 95% interval), time and memory; laid out as a table
with the paper's published numbers beside ours where given. Written as results.md, results.json and report.html
(image grid and a plot of the paired differences, matplotlib)."""
from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np

from faithful_inpaint.evaluation.stats import mean_interval, paired_difference, rate

TIME_FIELDS = ("seconds", "peak_rss_bytes", "peak_gpu_bytes")


def metric_fields(records: list[dict]) -> list[str]:
    """Numeric and boolean metric values present in the records, in first-seen order."""
    fields = {}
    for r in records:
        for k, v in r.get("metrics", {}).items():
            if isinstance(v, (bool, int, float)) and not isinstance(v, str):
                fields[k] = True
    return list(fields)


def summarise(records: dict[str, list[dict]], baselines: dict[str, str | None]) -> dict:
    """{variant: {"n", field: {"kind", "value": (v, lo, hi), "diff": (d, lo, hi) | None, "infinite": k}}}."""
    out = {}
    for name, rows in records.items():
        base = records.get(baselines.get(name) or "")
        s = {"n": len(rows), "baseline": baselines.get(name), "metrics": {}}
        for field in metric_fields(rows):
            values = [r["metrics"].get(field, math.nan) for r in rows]
            boolean = all(isinstance(v, bool) for v in values)
            entry = {"kind": "rate" if boolean else "mean",
                     "value": rate(values) if boolean else mean_interval([float(v) for v in values]),
                     "infinite": int(sum(1 for v in values if not boolean and math.isinf(float(v))))}
            if base is not None:
                entry["diff"] = paired_difference([float(v) for v in values],
                                                  [float(b["metrics"].get(field, math.nan)) for b in base])
            s["metrics"][field] = entry
        for field in TIME_FIELDS:
            vals = [r[field] for r in rows if r.get(field) is not None]
            if vals:
                s[field] = mean_interval(vals) if field == "seconds" else (float(max(vals)),)
        out[name] = s
    return out


def fmt(value: tuple, kind: str) -> str:
    v, lo, hi = value
    if math.isnan(v):
        return "-"
    if kind == "rate":
        return f"{100 * v:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"
    interval = "" if math.isnan(lo) else f" [{lo:.4g}, {hi:.4g}]"
    return f"{v:.4g}{interval}"


def fmt_diff(value: tuple, kind: str) -> str:
    d, lo, hi = value
    if math.isnan(d):
        return "-"
    if kind == "rate":
        return f"{100 * d:+.1f} pp [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return f"{d:+.4g} [{lo:+.4g}, {hi:+.4g}]" if not math.isnan(lo) else f"{d:+.4g}"


def markdown(title: str, summaries: dict, paper: dict | None = None, notes: list[str] = ()) -> str:
    """One table of values, one of paired differences; the paper's numbers as a column per metric when given
    ({variant: {field: number}})."""
    fields = list(dict.fromkeys(f for s in summaries.values() for f in s["metrics"]))
    lines = [f"# {title}", ""] + [f"{n}" for n in notes] + ([""] if notes else [])
    head = ["variant", "n"]
    for f in fields:
        head.append(f)
        if paper and any(f in p for p in paper.values()):
            head.append(f"{f} (paper)")
    head += ["s / image", "peak memory (MiB)"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in summaries.items():
        row = [name, str(s["n"])]
        for f in fields:
            e = s["metrics"].get(f)
            cell = fmt(e["value"], e["kind"]) if e else "-"
            if e and e["infinite"]:
                cell += f" ({e['infinite']} inf)"
            row.append(cell)
            if paper and any(f in p for p in paper.values()):
                pv = (paper.get(name) or {}).get(f)
                row.append("-" if pv is None else f"{pv:g}")
        row.append(f"{s['seconds'][0]:.2f}" if "seconds" in s else "-")
        peak = s.get("peak_gpu_bytes") or s.get("peak_rss_bytes")
        row.append(f"{peak[0] / 2**20:.0f}" if peak else "-")
        lines.append("| " + " | ".join(row) + " |")
    paired = [(n, s) for n, s in summaries.items() if s["baseline"]]
    if paired:
        lines += ["", "## Paired differences against the baseline (same cases, same seeds; 95% interval)", "",
                  "| variant | baseline | " + " | ".join(f"Δ {f}" for f in fields) + " |",
                  "|" + "---|" * (len(fields) + 2)]
        for name, s in paired:
            cells = [fmt_diff(s["metrics"][f]["diff"], s["metrics"][f]["kind"]) if f in s["metrics"] and
                     "diff" in s["metrics"][f] else "-" for f in fields]
            lines.append(f"| {name} | {s['baseline']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _png_data(fig_or_image) -> str:
    buf = io.BytesIO()
    if hasattr(fig_or_image, "savefig"):
        fig_or_image.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    else:
        fig_or_image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def diff_plot(summaries: dict):
    """Paired differences with their intervals, one panel per metric (matplotlib figure), or None."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paired = [(n, s) for n, s in summaries.items() if s["baseline"]]
    fields = list(dict.fromkeys(f for _, s in paired for f, e in s["metrics"].items() if "diff" in e))
    if not fields:
        return None
    fig, axes = plt.subplots(1, len(fields), figsize=(3.2 * len(fields), 0.5 + 0.45 * len(paired)), squeeze=False)
    for ax, f in zip(axes[0], fields):
        for y, (name, s) in enumerate(paired):
            e = s["metrics"].get(f)
            if e and "diff" in e and not math.isnan(e["diff"][0]):
                d, lo, hi = e["diff"]
                ax.errorbar([d], [y], xerr=None if math.isnan(lo) else [[d - lo], [hi - d]], fmt="o", capsize=3)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_yticks(range(len(paired)), [n for n, _ in paired] if ax is axes[0][0] else [""] * len(paired))
        ax.set_title(f"Δ {f}", fontsize=9)
    fig.tight_layout()
    return fig


def image_grid(rows: list[list[np.ndarray]], labels: list[str], tile: int = 128):
    """A PIL image: one row per case, one column per label (input, then each variant)."""
    from PIL import Image, ImageDraw

    band = 14
    grid = Image.new("RGB", (tile * len(labels), band + tile * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.text((c * tile + 3, 2), label[: tile // 6], fill="black")
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            if img is None:
                continue
            im = Image.fromarray((np.clip(img, 0, 1) * 255).round().astype(np.uint8)).resize((tile, tile))
            grid.paste(im, (c * tile, band + r * tile))
    return grid


def write(out: str | Path, title: str, summaries: dict, records: dict, *, paper: dict | None = None,
          notes: list[str] = (), grid=None, settings: dict | None = None) -> list[Path]:
    """results.md, results.json and report.html in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(title, summaries, paper, list(notes))
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps({"title": title, "settings": settings or {}, "summary": summaries,
                                                  "paper": paper or {}, "records": records}, indent=1, default=str))
    parts = [f"<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
             "<style>body{font-family:sans-serif;margin:2em} table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:13px}</style></head><body>"]
    for block in text.split("\n\n"):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if lines and lines[0].startswith("|"):
            parts.append("<table>")
            for i, ln in enumerate(l for l in lines if not l.startswith("|---")):
                tag = "th" if i == 0 else "td"
                cells = [c.strip() for c in ln.strip("|").split("|")]
                parts.append("<tr>" + "".join(f"<{tag}>{html.escape(c)}</{tag}>" for c in cells) + "</tr>")
            parts.append("</table>")
        elif lines:
            for ln in lines:
                level = len(ln) - len(ln.lstrip("#"))
                body = html.escape(ln.lstrip("# "))
                parts.append(f"<h{level}>{body}</h{level}>" if level else f"<p>{body}</p>")
    fig = diff_plot(summaries)
    if fig is not None:
        parts.append(f"<h2>Paired differences</h2><img src='{_png_data(fig)}'>")
        import matplotlib.pyplot as plt

        plt.close(fig)
    if grid is not None:
        parts.append(f"<h2>Cases</h2><img src='{_png_data(grid)}'>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))
    return [out / "results.md", out / "results.json", out / "report.html"]
