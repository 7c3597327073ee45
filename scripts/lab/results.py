#!/usr/bin/env python3
"""Collects the lab machine's LAB-RESULT lines into results.json and prints the summary table.

usage: results.py CONSOLE_LOG RESULTS_JSON SECONDS SCENARIO...
Exit status 1 if any scenario failed or gave no result.
"""
import json
import statistics
import sys


def main():
    console, out, seconds, expected = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    results = {}
    with open(console, errors="replace", newline="\n") as f:
        for line in f:
            if line.startswith("LAB-RESULT "):
                try:
                    # strict=False: a guest's serial line may carry a control character.
                    r = json.loads(line[len("LAB-RESULT "):].rstrip("\n"), strict=False)
                except json.JSONDecodeError as e:
                    r = {"name": line.split('"name":"')[-1].split('"')[0], "ok": False,
                         "detail": f"unreadable result line ({e})"}
                results[r["name"]] = r
    ordered = []
    for name in expected:
        r = results.get(name) or {"name": name, "ok": False,
                                  "detail": "no result: the lab machine ended before it"}
        if name not in results:
            print(f"lab: {name} FAILED {r['detail']}")
        ordered.append(r)
    with open(out, "w") as f:
        json.dump(ordered, f, indent=1)

    print(f"\n{'scenario':22} {'ok':4} {'total ms':>9} {'sent MiB':>9} {'used MiB':>9} "
          f"{'downtime':>9} {'hints':>7} {'hinted':>9} {'dest RSS':>9}")
    for r in ordered:
        rep = r.get("report", {})
        hints = r.get("hints") or rep.get("hints") or {}
        sent = r.get("bytes_sent")
        print(f"{r['name']:22} {'yes' if r['ok'] else 'NO':4} {fmt(r.get('total_ms')):>9} "
              f"{fmt(sent / 2**20 if sent is not None else None):>9} {fmt(r.get('used_mib')):>9} "
              f"{fmt(r.get('downtime_ms')):>9} {hints.get('mode', '-'):>7} "
              f"{fmt(hints.get('pages_hinted')):>9} {fmt(r.get('dest_rss_mib')):>9}")
    targets(ordered)
    failed = [r["name"] for r in ordered if not r["ok"]]
    print(f"\nlab: {len(ordered) - len(failed)} passed, {len(failed)} failed "
          f"({seconds} s in the lab machine); results in {out}")
    return 1 if failed else 0


def fmt(v):
    if v is None:
        return "-"
    return f"{v:.0f}" if isinstance(v, (int, float)) else str(v)


def runs(results, name):
    return [r for r in results if r["name"].split(".")[0] == name and r["ok"]]


def targets(results):
    """The issue's targets, from whatever scenarios ran."""
    lines = []
    stock, off, qemu = runs(results, "migrate-stock"), runs(results, "migrate-off"), runs(results, "qemu-stock")
    if stock:
        within = [r for r in stock if r.get("used_mib") is not None
                  and r["bytes_sent"] <= (r["used_mib"] + 64) * 2**20]
        lines.append(f"stock hints: bytes sent <= used + 64 MiB in {len(within)} of {len(stock)} runs")
    if stock and off:
        on_ms = statistics.median(r["total_ms"] for r in stock)
        off_ms = statistics.median(r["total_ms"] for r in off)
        lines.append(f"stock hints (Debian default init_on_alloc=1) vs off, median total: "
                     f"{on_ms:.0f} vs {off_ms:.0f} ms = "
                     f"{off_ms / on_ms:.1f}x shorter (target >= 4x)")
    for name, label in (("init-on-alloc-0", "stock hints with init_on_alloc=0"),
                        ("migrate-ranges", "ranges hints (patched driver)")):
        fast = runs(results, name)
        if fast and off:
            on_ms = statistics.median(r["total_ms"] for r in fast)
            off_ms = statistics.median(r["total_ms"] for r in off)
            lines.append(f"{label} vs off, median total: {on_ms:.0f} vs {off_ms:.0f} ms = "
                         f"{off_ms / on_ms:.1f}x shorter")
    if qemu:
        lines.append("QEMU stock hints, same guest: " + ", ".join(
            f"{r['total_ms']:.0f} ms / {r['bytes_sent'] / 2**20:.0f} MiB" for r in qemu))
    for name in ("ranges-fragmented", "stock-fragmented"):
        for r in runs(results, name):
            lines.append(f"{name}: {r.get('skipped_pct')}% of free pages skipped (ranges target >= 95%)")
    if lines:
        print("\ntargets:")
        for line in lines:
            print(f"  {line}")


if __name__ == "__main__":
    sys.exit(main())
