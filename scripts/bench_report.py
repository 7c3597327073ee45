#!/usr/bin/env python3
"""Tables and charts of migration benchmark rows (scripts/bench-qemu.sh, scripts/bench-migration.sh).

  bench_report.py table <json files...>          one table of all rows (median per row key, n shown)
  bench_report.py chart <out.png> <json files...> grouped bars: total ms and sent MiB per
                                                  case / size (/ transport) and vmm / mode
  bench_report.py sizes <out.png|-> <json files...> time against RAM size: per case / transport /
                                                  mode, total, downtime, sent MiB and dest RSS at
                                                  each size, and slowest / fastest size (the
                                                  target: within 2x); a line chart unless "-"
  bench_report.py ratios <json files...>         our VMM's ratios per case / size / transport
                                                  (full/hints, zero/hints, sent and dest RSS vs
                                                  used memory, total vs raw-bandwidth model,
                                                  downtime) and PASS/MISS per project target

Input files may hold a JSON array of rows, an object with a "rows" (or "runs" / "results") list,
a single row object, or JSON lines. A row is an object such as
  {"vmm":"qemu","case":"ended","mem_gib":1,"transport":"unix","mode":"qemu-hints","run":1,
   "total_ms":812,"downtime_ms":9,"bytes_sent":123456,"dest_rss_bytes":456789,"integrity":"ok"}
Missing fields print as "-"; unknown fields are ignored. Rows with the same vmm, case, mem_gib,
transport and mode are one table row: numbers are their median, n is how many runs it has, and
integrity is "ok" only if every run was ok. "raw MiB/s" is the row's raw_bw_bytes_per_s if any.
The table needs only the standard library; the chart needs matplotlib (skipped with a message
if it cannot be imported).
"""
import json
import statistics
import sys

MIB = 1 << 20
KEY = ("vmm", "case", "mem_gib", "transport", "mode")
CASE_ORDER = {"idle": 0, "ended": 1, "hot": 2}
MODE_ORDER = {"full": 0, "zero": 1, "hints": 2, "ranges": 3, "noballoon": 4, "qemu-nohints": 5,
              "qemu-hints": 6}
VMM_ORDER = {"ours": 0, "qemu": 1}


def load_rows(paths):
    rows = []
    for path in paths:
        try:
            with open(path) as f:
                text = f.read()
        except OSError as e:
            print("bench_report: cannot read %s: %s" % (path, e), file=sys.stderr)
            continue
        data = None
        try:
            data = json.loads(text) if text.strip() else []
        except ValueError:
            data = []
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip().rstrip(",")
                if not line or line in "[]":
                    continue
                try:
                    data.append(json.loads(line))
                except ValueError:
                    print("bench_report: %s:%d: not JSON, skipped" % (path, n), file=sys.stderr)
        if isinstance(data, dict):
            for k in ("rows", "runs", "results"):
                if isinstance(data.get(k), list):
                    data = data[k]
                    break
            else:
                data = [data]
        if not isinstance(data, list):
            data = []
        rows.extend(r for r in data if isinstance(r, dict))
    return rows


def num(v):
    """A float from a number or numeric string; None otherwise (bools are not numbers)."""
    if isinstance(v, bool) or v is None:
        return None
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(str(v).strip())
    except ValueError:
        return None


def median(rows, field, scale=1.0):
    vals = [num(r.get(field)) for r in rows]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) / scale if vals else None


def key_of(r):
    def norm(k):
        v = r.get(k)
        if v is None:
            return ""
        if k == "mem_gib" and num(v) is not None:
            f = num(v)
            return int(f) if f == int(f) else f
        return v if isinstance(v, (str, int, float)) else str(v)
    return tuple(norm(k) for k in KEY)


def sort_key(k):
    vmm, case, mem, transport, mode = k
    m = num(mem)
    return (VMM_ORDER.get(vmm, 9), str(vmm), CASE_ORDER.get(case, 9), str(case),
            m if m is not None else 1e18, str(transport), MODE_ORDER.get(mode, 9), str(mode))


def group(rows):
    groups = {}
    for r in rows:
        groups.setdefault(key_of(r), []).append(r)
    return [(k, groups[k]) for k in sorted(groups, key=sort_key)]


def integrity(rows):
    vals = [str(r.get("integrity", "unknown")) for r in rows]
    n = len(vals)
    fails = sum(v.upper() == "FAILED" for v in vals)
    oks = sum(v == "ok" for v in vals)
    if fails:
        return "FAILED" if fails == n else "FAILED %d/%d" % (fails, n)
    if oks == n:
        return "ok"
    return "unknown" if oks == 0 else "ok %d/%d" % (oks, n)


def fmt(v, digits=0):
    if v is None:
        return "-"
    if isinstance(v, float):
        if digits == 0:
            return "%.0f" % v
        return "%.*f" % (digits, v)
    return str(v)


def table(paths):
    rows = load_rows(paths)
    if not rows:
        print("bench_report: no rows in %s" % " ".join(paths), file=sys.stderr)
        return 1
    head = ["vmm", "case", "mem GiB", "transport", "mode", "total ms", "downtime ms", "sent MiB",
            "dest RSS MiB", "raw MiB/s", "integrity", "n"]
    right = {2, 5, 6, 7, 8, 9, 11}
    lines = []
    for k, rs in group(rows):
        vmm, case, mem, transport, mode = (("-" if v == "" else v) for v in k)
        dt = median(rs, "downtime_ms")
        lines.append([
            str(vmm), str(case), fmt(mem), str(transport), str(mode),
            fmt(median(rs, "total_ms")),
            fmt(dt, 1 if dt is not None and dt < 10 else 0),
            fmt(median(rs, "bytes_sent", MIB)),
            fmt(median(rs, "dest_rss_bytes", MIB)),
            fmt(median(rs, "raw_bw_bytes_per_s", MIB)),
            integrity(rs), str(len(rs)),
        ])
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]

    def render(cells):
        return "| " + " | ".join(c.rjust(w) if i in right else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths))) + " |"

    print(render(head))
    print("|" + "|".join(("-" * (w + 1) + ":" if i in right else ":" + "-" * (w + 1))
                         for i, w in enumerate(widths)) + "|")
    for l in lines:
        print(render(l))
    runs = sum(len(rs) for _, rs in group(rows))
    print("(%d runs; numbers are medians over n runs; sent = bytes_sent)" % runs)
    return 0


def chart(out, paths):
    rows = load_rows(paths)
    if not rows:
        print("bench_report: no rows in %s" % " ".join(paths), file=sys.stderr)
        return 1
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print("bench_report: matplotlib is not available (%s); no chart written. "
              "Install it (e.g. apt-get install python3-matplotlib) for %s." % (e, out), file=sys.stderr)
        return 0
    rows = [r for r in rows if r.get("case") is not None and r.get("mode") is not None
            and (num(r.get("total_ms")) is not None or num(r.get("bytes_sent")) is not None)]
    if not rows:
        print("bench_report: no rows with case, mode and numbers to chart", file=sys.stderr)
        return 1
    grouped = group(rows)
    transports = {k[3] for k, _ in grouped}
    xkey = lambda k: (k[1], k[2], k[3]) if len(transports) > 1 else (k[1], k[2])
    xs, series = [], []
    for k, _ in grouped:
        x, s = xkey(k), (k[0], k[4])
        if x not in xs:
            xs.append(x)
        if s not in series:
            series.append(s)
    xs.sort(key=lambda x: (CASE_ORDER.get(x[0], 9), str(x[0]), num(x[1]) or 0, x[2:]))
    series.sort(key=lambda s: (VMM_ORDER.get(s[0], 9), str(s[0]), MODE_ORDER.get(s[1], 9), str(s[1])))
    values = {(xkey(k), (k[0], k[4])): rs for k, rs in grouped}

    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.2 * len(xs) * max(1, len(series)) / 3 + 4), 8),
                             sharex=True)
    width = 0.8 / max(1, len(series))
    for ax, field, scale, label in ((axes[0], "total_ms", 1.0, "total ms"),
                                    (axes[1], "bytes_sent", MIB, "sent MiB")):
        for j, s in enumerate(series):
            hs = []
            for x in xs:
                rs = values.get((x, s))
                v = median(rs, field, scale) if rs else None
                hs.append(v if v is not None else 0)
            pos = [i + (j - (len(series) - 1) / 2) * width for i in range(len(xs))]
            ax.bar(pos, hs, width, label="%s %s" % s)
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize="small", ncol=min(4, len(series)))
    axes[1].set_xticks(range(len(xs)))
    axes[1].set_xticklabels(["%s\n%s GiB%s" % (x[0], fmt(x[1]), (" " + x[2]) if len(x) > 2 else "")
                             for x in xs])
    axes[0].set_title("Live migration: total time and data sent (median of runs)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("bench_report: wrote %s" % out, file=sys.stderr)
    return 0


def sizes(out, paths):
    """Time against RAM size: one line per (vmm, case, transport, mode) over mem_gib."""
    rows = [r for r in load_rows(paths) if num(r.get("mem_gib")) is not None]
    lines = {}
    for k, rs in group(rows):
        vmm, case, mem, transport, mode = k
        lines.setdefault((vmm, case, transport, mode), []).append((num(mem), rs))
    if not lines:
        print("bench_report: no rows with mem_gib in %s" % " ".join(paths), file=sys.stderr)
        return 1
    order = lambda s: (VMM_ORDER.get(s[0], 9), CASE_ORDER.get(s[1], 9), str(s[2]),
                       MODE_ORDER.get(s[3], 9), str(s[3]))
    print("Time against RAM size (median total ms / downtime ms / sent MiB / dest RSS MiB per size)")
    for s in sorted(lines, key=order):
        pts = sorted(lines[s], key=lambda p: p[0])
        cells = []
        totals = []
        for gib, rs in pts:
            t = median(rs, "total_ms")
            totals.append(t)
            cells.append("%s GiB: %s / %s / %s / %s" % (
                fmt(gib), fmt(t), fmt(median(rs, "downtime_ms"), 1),
                fmt(median(rs, "bytes_sent", MIB)), fmt(median(rs, "dest_rss_bytes", MIB))))
        ts = [t for t in totals if t]
        spread = ("slowest/fastest %.2fx" % (max(ts) / min(ts))) if len(ts) > 1 else ""
        print("  %s %s %s %s: %s  %s" % (s[0], s[1], s[2], s[3], "; ".join(cells), spread))
    if out == "-":
        return 0
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        print("bench_report: matplotlib is not available (%s); no chart written" % e, file=sys.stderr)
        return 0
    fig, axes = plt.subplots(1, 2, figsize=(12, 5))
    for s in sorted(lines, key=order):
        pts = sorted(lines[s], key=lambda p: p[0])
        xs = [g for g, _ in pts]
        for ax, field, scale in ((axes[0], "total_ms", 1.0), (axes[1], "bytes_sent", MIB)):
            ys = [median(rs, field, scale) for _, rs in pts]
            ax.plot(xs, [y if y is not None else float("nan") for y in ys], marker="o",
                    label="%s %s %s" % (s[1], s[3], s[2]))
    for ax, label in ((axes[0], "total ms"), (axes[1], "sent MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("guest RAM (GiB)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        xs = sorted({g for pts in lines.values() for g, _ in pts})
        ax.set_xticks(xs)
        ax.set_xticklabels([fmt(x) for x in xs])
    axes[0].legend(fontsize="small")
    axes[0].set_title("Total migration time against RAM size")
    axes[1].set_title("Data sent against RAM size")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print("bench_report: wrote %s" % out, file=sys.stderr)
    return 0


# The project's targets (measured by scripts/bench-migration.sh, never asserted in a test).
TARGET_GIB = 8
HINTED_MODES = ("hints", "ranges")


def used_bytes(r):
    """The guest's live memory in a row: used_mib + hot_mib, or 256 (+ 64 for hot) by case."""
    used, hot = num(r.get("used_mib")), num(r.get("hot_mib"))
    if used is None:
        used = 256.0
    if hot is None:
        hot = 64.0 if r.get("case") == "hot" else 0.0
    return (used + hot) * MIB


def model_ratio(r):
    """total_ms / (bytes_sent / raw bandwidth + hint wait) of one run, or None."""
    total, sent, bw = num(r.get("total_ms")), num(r.get("bytes_sent")), num(r.get("raw_bw_bytes_per_s"))
    wait = num(r.get("hint_wait_ms")) or 0.0
    if total is None or sent is None or not bw:
        return None
    model = sent / bw * 1000.0 + wait
    return total / model if model > 0 else None


def med(vals):
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def ratios(paths):
    rows = [r for r in load_rows(paths)
            if r.get("vmm") == "ours" and (r.get("status") in (None, "completed"))]
    if not rows:
        print("bench_report: no completed rows of our VMM (vmm \"ours\") in %s" % " ".join(paths),
              file=sys.stderr)
        return 1
    cells = {}
    for k, rs in group(rows):
        _, case, mem, transport, mode = k
        cells.setdefault((case, mem, transport), {})[mode] = rs
    xs = sorted(cells, key=lambda x: (CASE_ORDER.get(x[0], 9), str(x[0]),
                                      num(x[1]) if num(x[1]) is not None else 1e18, str(x[2])))

    def pct(v):
        return "-" if v is None else "%+.1f%%" % v

    def x(v, d=1):
        return "-" if v is None else "%.*fx" % (d, v)

    head = ["case", "mem GiB", "transport", "mode", "full/hints time", "zero/hints time",
            "sent vs used", "total / (bytes/raw + wait)", "dest RSS vs used", "downtime ms", "n"]
    lines, stats = [], {}
    for cell in xs:
        modes = cells[cell]
        full_t = median(modes.get("full", []), "total_ms")
        zero_t = median(modes.get("zero", []), "total_ms")
        for hm in HINTED_MODES:
            rs = modes.get(hm)
            if not rs:
                continue
            t = median(rs, "total_ms")
            used = med([used_bytes(r) for r in rs])
            sent = median(rs, "bytes_sent")
            rss = median(rs, "dest_rss_bytes")
            st = {
                "full_x": full_t / t if full_t is not None and t else None,
                "zero_x": zero_t / t if zero_t is not None and t else None,
                "sent_pct": (sent / used - 1) * 100 if sent is not None else None,
                "model_x": med([model_ratio(r) for r in rs]),
                "rss_pct": (rss / used - 1) * 100 if rss is not None else None,
                "downtime": median(rs, "downtime_ms"),
            }
            stats[cell + (hm,)] = st
            dt = st["downtime"]
            lines.append([str(cell[0]), fmt(cell[1]), str(cell[2]), hm, x(st["full_x"]), x(st["zero_x"], 2),
                          pct(st["sent_pct"]), x(st["model_x"], 2), pct(st["rss_pct"]),
                          fmt(dt, 1 if dt is not None and dt < 10 else 0), str(len(rs))])
    if not lines:
        print("(no hints or ranges rows: no ratios against hints)")
    else:
        right = set(range(1, len(head))) - {2, 3}
        widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]

        def render(c):
            return "| " + " | ".join(v.rjust(w) if i in right else v.ljust(w)
                                     for i, (v, w) in enumerate(zip(c, widths))) + " |"

        print(render(head))
        print("|" + "|".join(("-" * (w + 1) + ":" if i in right else ":" + "-" * (w + 1))
                             for i, w in enumerate(widths)) + "|")
        for l in lines:
            print(render(l))
        print("(medians; used = 256 MiB live + hot; sent = bytes_sent of the hints row; model = "
              "bytes_sent / raw_bw_bytes_per_s + hint_wait_ms, per run)")

    # Every mode against the raw copy: where the VMM falls short of the transport.
    print()
    print("Effective rate (bytes_sent / total_ms) vs the raw copy of the same bytes:")
    eh = ["case", "mem GiB", "transport", "mode", "MiB/s", "raw MiB/s", "of raw", "total / model", "n"]
    el = []
    for cell in xs:
        for mode in sorted(cells[cell], key=lambda m: (MODE_ORDER.get(m, 9), str(m))):
            rs = cells[cell][mode]
            rates = [num(r.get("bytes_sent")) / num(r.get("total_ms")) * 1000.0 / MIB
                     for r in rs if num(r.get("bytes_sent")) is not None and num(r.get("total_ms"))]
            rate, raw = med(rates), median(rs, "raw_bw_bytes_per_s", MIB)
            el.append([str(cell[0]), fmt(cell[1]), str(cell[2]), str(mode), fmt(rate), fmt(raw),
                       "-" if rate is None or not raw else "%.0f%%" % (100 * rate / raw),
                       x(med([model_ratio(r) for r in rs]), 2), str(len(rs))])
    eright = set(range(1, len(eh))) - {2, 3}
    ew = [max(len(h), *(len(l[i]) for l in el)) for i, h in enumerate(eh)]
    print("| " + " | ".join(h.rjust(w) if i in eright else h.ljust(w) for i, (h, w) in enumerate(zip(eh, ew))) + " |")
    print("|" + "|".join(("-" * (w + 1) + ":" if i in eright else ":" + "-" * (w + 1)) for i, w in enumerate(ew)) + "|")
    for l in el:
        print("| " + " | ".join(v.rjust(w) if i in eright else v.ljust(w) for i, (v, w) in enumerate(zip(l, ew))) + " |")

    # Targets: `ended` at 8 GiB, per transport and hinted mode; idle downtime at every size.
    print()
    print("Targets (measured, not asserted):")
    checks = (
        ("sent_pct", "hints bytes_sent <= used + 3%", lambda v: v <= 3.0, pct),
        ("full_x", "full/hints total time >= 13.5", lambda v: v >= 13.5, x),
        ("zero_x", "hints faster than zero", lambda v: v > 1.0, lambda v: "zero/hints " + x(v, 2)),
        ("model_x", "hints total <= 1.5 x (bytes/raw + hint wait)", lambda v: v <= 1.5, lambda v: x(v, 2)),
        ("rss_pct", "dest RSS <= used + 5%", lambda v: v <= 5.0, pct),
    )
    ended = [k for k in stats if k[0] == "ended"]
    at_target = [k for k in ended if num(k[1]) == TARGET_GIB]
    note = ""
    if not at_target and ended:
        biggest = max(num(k[1]) for k in ended)
        at_target = [k for k in ended if num(k[1]) == biggest]
        note = " (indicative: no %d GiB rows, shown at %s GiB)" % (TARGET_GIB, fmt(biggest))
    if not ended:
        print("  ended %d GiB: not measured (no ended rows)" % TARGET_GIB)
    passes = misses = 0
    for k in sorted(at_target, key=lambda k: (str(k[2]), str(k[3]))):
        print("  ended %s GiB %s %s%s:" % (fmt(k[1]), k[2], k[3], note))
        for field, label, ok, show in checks:
            v = stats[k][field]
            if v is None:
                verdict, shown = "n/a ", "not measured"
            else:
                good = ok(v)
                verdict, shown = ("PASS" if good else "MISS"), show(v)
                passes, misses = passes + good, misses + (not good)
            print("    %s  %-46s %s" % (verdict, label, shown))
    idle = sorted((k for k in stats if k[0] == "idle"),
                  key=lambda k: (num(k[1]) or 0, str(k[2]), str(k[3])))
    if not idle:
        print("  idle downtime < 50 ms: not measured (no idle rows)")
    for k in idle:
        v = stats[k]["downtime"]
        if v is None:
            print("    n/a   idle %s GiB %s %s downtime < 50 ms" % (fmt(k[1]), k[2], k[3]))
            continue
        good = v < 50.0
        passes, misses = passes + good, misses + (not good)
        print("    %s  %-46s %.1f ms" % ("PASS" if good else "MISS",
                                         "idle %s GiB %s %s downtime < 50 ms" % (fmt(k[1]), k[2], k[3]), v))
    print("(%d PASS, %d MISS)" % (passes, misses))
    return 0


def main(argv):
    if len(argv) >= 2 and argv[0] == "table":
        return table(argv[1:])
    if len(argv) >= 2 and argv[0] == "ratios":
        return ratios(argv[1:])
    if len(argv) >= 3 and argv[0] == "sizes":
        return sizes(argv[1], argv[2:])
    if len(argv) >= 3 and argv[0] == "chart":
        return chart(argv[1], argv[2:])
    print(__doc__.strip(), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
