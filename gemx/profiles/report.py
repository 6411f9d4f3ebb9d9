"""Render a profile: a rich table grouped like the paper's Table 3, JSON, CSV and a latency plot."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, fields
from pathlib import Path

from rich.table import Table

from gemx.errors import GemxError
from gemx.fs import atomic_write
from gemx.profiles.machine import GEMM_SIDE
from gemx.profiles.sweep import EXACT_DB, ProfileResult, ProfileRow


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def table(result: ProfileResult) -> Table:
    m = result.machine
    where = m["gpu"]["name"] if m["gpu"] else f"{m['cpu']}, {m['threads']} threads"
    t = Table(title=f"per-frame cost, {where} (ms; references encoded once per set)")
    for col, justify in (("block", "right"), ("size", "right"), ("runtime", "left"), ("refs", "right"), ("frame p50", "right"),
                         ("p90", "right"), ("fps", "right"), ("ms/MPx", "right"), ("encode refs", "right"),
                         ("naive p50", "right"), ("vs naive", "right"), ("KV cache MB", "right"), ("peak MB", "right"),
                         ("frame GFLOPs", "right"), ("GMAC/s (% of GEMM)", "right"), ("PSNR vs FP32", "right"),
                         ("PSNR vs truth", "right")):
        t.add_column(col, justify=justify)
    by_key: dict[tuple, dict[str, ProfileRow]] = {}
    for r in result.rows:
        key = (r.block_size, (r.height, r.width), r.runtime if r.stage != "naive" else "naive", r.precision, r.refs)
        by_key.setdefault(key, {})[r.stage] = r
    naive = {(b, size, refs): rows["naive"] for (b, size, rt, _, refs), rows in by_key.items() if rt == "naive"}
    last_group = None
    for (block, (h, w), runtime, precision, refs), rows in by_key.items():
        if runtime == "naive":
            continue
        f, e, n = rows.get("frame"), rows.get("encode"), naive.get((block, (h, w), refs))
        if last_group is not None and last_group != (block, (h, w), runtime, precision):
            t.add_section()
        last_group = (block, (h, w), runtime, precision)
        t.add_row(f"{block}x{block}", f"{w}x{h}", f"{runtime} {f.precision}", str(refs), f"{f.p50_ms:.2f}",
                  f"{f.p90_ms:.2f}", f"{f.fps:.1f}", f"{f.p50_ms / (h * w / 1e6):.1f}" if h else "-",
                  f"{e.p50_ms:.1f}" if e else "-", f"{n.p50_ms:.1f}" if n else "-", f"{f.p50_ms / n.p50_ms:.2f}x" if n else "-",
                  _mb(f.kv_cache_bytes), _mb(f.peak_memory_bytes), f"{f.flops / 1e9:.2f}",
                  _rate(f, m.get("gemm_peak_gmacs", {})), _db(f.psnr_vs_fp32_db), _db(f.psnr_vs_truth_db))
    if m.get("gemm_peak_gmacs"):
        peaks = ", ".join(f"{p} {v:.0f}" for p, v in m["gemm_peak_gmacs"].items())
        t.caption = (f"GMAC/s: the frame graph's multiply-accumulates over its p50; the roof is a {GEMM_SIDE}x{GEMM_SIDE} GEMM in "
                     f"oneDNN on this CPU ({', '.join(m.get('cpu_flags', [])) or 'no AVX-512'}), GMAC/s: {peaks}")
    return t


def _rate(row: ProfileRow, peaks: dict[str, float]) -> str:
    """Achieved GMAC/s of a frame row, and its share of this CPU's GEMM peak in the row's precision."""
    if not row.flops or not row.p50_ms:
        return "-"
    gmacs = row.flops / 2 / (row.p50_ms / 1e3) / 1e9
    peak = peaks.get(row.precision)
    return f"{gmacs:.0f} ({100 * gmacs / peak:.0f}%)" if peak else f"{gmacs:.0f}"


def _db(v: float | None) -> str:
    if v is None:
        return "-"
    return "exact" if v >= EXACT_DB else f"{v:.1f}"


def ops_table(result: ProfileResult, top: int = 6) -> Table:
    """Per-frame kernel time by op type (ORT CPU), with the share spent on layout changes."""
    table = Table(title="ORT CPU per-frame kernel time by op type (ms); layout = Transpose + ORT Reorder nodes")
    for col in ("block", "size", "precision", "refs", "total", "layout share", *(f"#{i + 1}" for i in range(top))):
        table.add_column(col, justify="right")
    for row in result.ops:
        ms = row["ms_per_frame"]
        cells = [f"{op} {v:.2f}" for op, v in list(ms.items())[:top]]
        table.add_row(str(row["block_size"]), f"{row.get('width', '?')}x{row.get('height', '?')}", row.get("precision", "fp32"),
                      str(row["refs"]), f"{sum(ms.values()):.1f}",
                      f"{100 * row['layout_share']:.1f}%",
                      *cells, *([""] * (top - len(cells))))
    return table


def write_json(result: ProfileResult, path: Path, overwrite: bool = False) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(result.to_dict(), indent=2) + "\n"), overwrite)


def write_csv(result: ProfileResult, path: Path, overwrite: bool = False) -> None:
    machine = {"cpu": result.machine["cpu"], "threads": result.machine["threads"],
               "gpu": (result.machine["gpu"] or {}).get("name", ""), **{f"{k}_version": v for k, v in result.machine["versions"].items()}}

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[fl.name for fl in fields(ProfileRow)] + list(machine))
            w.writeheader()
            for r in result.rows:
                w.writerow({**asdict(r), **machine})

    atomic_write(path, write, overwrite)


def check_plot_path(path: Path | None) -> None:
    """Refuse, before a sweep, a plot file whose format matplotlib cannot write (no suffix means PNG)."""
    if path is None or not Path(path).suffix:
        return
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    if Path(path).suffix.lstrip(".").lower() not in formats:
        raise GemxError(f"cannot plot to {path}: {Path(path).suffix} is not an image format; use one of "
                        f"{', '.join('.' + f for f in sorted(formats))}")


def plot(result: ProfileResult, path: Path, overwrite: bool = False) -> None:
    """Per-frame p50 latency vs reference count: the split runtimes on their own scale (left), and against the
    naive full recompute on a log scale (right), where an order of magnitude would flatten them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lines: dict[str, list[tuple[int, float]]] = {}
    several_sizes = len({(r.height, r.width) for r in result.rows}) > 1
    for r in result.rows:
        if r.stage in ("frame", "naive"):
            label = _label(r, several_sizes) + (" naive (re-encode every frame)" if r.stage == "naive" else "")
            lines.setdefault(label, []).append((r.refs, r.p50_ms))
    has_naive = any("naive" in label for label in lines)
    panels = 2 + has_naive + several_sizes
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    palette = plt.get_cmap("tab10" if len(lines) <= 10 else "tab20").colors
    colors = {label: palette[i % len(palette)] for i, label in enumerate(sorted(lines))}  # one colour per row group, every panel
    _quality_panel(axes[0][-1], result, colors, several_sizes)
    if several_sizes:
        _pixels_panel(axes[0][-2], result)
        axes = [axes[0][:-2]]
    else:
        axes = [axes[0][:-1]]
    for ax, naive_panel in zip(axes[0], (False, True), strict=False):
        for label, pts in sorted(lines.items()):
            if "naive" in label and not naive_panel:
                continue
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="--" if "naive" in label else "-", label=label,
                    color=colors[label])
        ax.set(xlabel="references", ylabel="per-frame latency, p50 (ms)" + (", log scale" if naive_panel else ""),
               title="against re-encoding every frame" if naive_panel else "references encoded once per set")
        if naive_panel:
            ax.set_yscale("log")
        ax.set_xticks(sorted({r.refs for r in result.rows}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    m = result.machine
    fig.suptitle(f"gemx profile on {m['gpu']['name'] if m['gpu'] else m['cpu']}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".").lower() or "png"), overwrite)
    plt.close(fig)


def _label(r: ProfileRow, with_size: bool) -> str:
    return f"{r.block_size}x{r.block_size} {r.runtime} {r.precision}" + (f" {r.width}x{r.height}" if with_size else "")


def _pixels_panel(ax, result: ProfileResult) -> None:
    """Per-frame p50 against the frame's megapixels, one line per block size, runtime, precision and reference count:
    a straight line through the origin is cost proportional to pixels."""
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        if r.stage == "frame" and r.height:
            lines.setdefault(f"{r.block_size}x{r.block_size} {r.runtime} {r.precision} {r.refs} refs", []).append(
                (r.height * r.width / 1e6, r.p50_ms))
    for label, pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set(xlabel="frame size (megapixels, HR)", ylabel="per-frame latency, p50 (ms)", title="cost against pixels")
    ax.set_xlim(left=0)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


def _quality_panel(ax, result: ProfileResult, colors: dict[str, str], with_size: bool = False) -> None:
    """Quality next to latency: each (block, runtime, precision, refs) frame row as one point."""
    truth = any(r.psnr_vs_truth_db is not None for r in result.rows)
    groups: dict[str, list[tuple[float, float]]] = {}
    for r in result.rows:
        if r.stage != "frame":
            continue
        q = r.psnr_vs_truth_db if truth else r.psnr_vs_fp32_db
        if q is not None:
            groups.setdefault(_label(r, with_size), []).append((r.p50_ms, q))
    for label, pts in sorted(groups.items()):
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=label, s=18, color=colors.get(label))
    ax.set(xlabel="per-frame latency, p50 (ms)",
           ylabel="PSNR vs the video's HR frames (dB)" if truth else f"PSNR vs FP32 (dB; {EXACT_DB:.0f} = exact)",
           title="quality vs latency (one point per reference count)")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    if groups:
        ax.legend(fontsize=7)
