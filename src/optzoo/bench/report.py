"""The benchmark's targets, its stdout table, and ``latest.json`` / ``latest.md``."""
from __future__ import annotations

import json
import math
from pathlib import Path

__all__ = ["TARGETS", "evaluate_targets", "text_report", "markdown_report", "write_results", "mode_name",
           "update_readme"]

README_START, README_END = "<!-- bench:latest:start -->", "<!-- bench:latest:end -->"

#: The issue's targets (CPU; ratios within one run). Checked for the fast modes (fused None and True). A limit of
#: None is the row's own (the GB/s target, by mode and optimizer: :data:`GBPS_LIMITS`), put into the text.
TARGETS = {
    "gbps_vs_adam": (("single", "resnet50"), None, "GB/s >= {limit:g} x torch fused Adam's"),
    "time_vs_peer": (("single", "resnet50"), 1.0, "ms/step <= 1.0 x torch's fastest (same algorithm)"),
    "time_vs_adam": (("small", "scheduled"), 1.5, "ms/step <= 1.5 x torch fused Adam's"),
    "time_vs_adam_loaded": (("loaded",), 2.0, "ms/step <= 2 x torch fused Adam's under the same load"),
    # the embedding's lazy steps (optimizer rows of results["embedding"], the default path)
    "lazy_vs_dense": (("embedding",), 100.0, "lazy step >= 100 x faster than the dense step of the same table"),
    "lazy_vs_peer": (("embedding",), 1.0, "lazy ms/step <= 1.0 x torch's sparse optimizer's"),
}
TARGET_MODES = (None, True)
#: The GB/s target by mode and optimizer, as the issue sets it: without a flag (``fused=None``) every optimizer
#: >= 0.8 x torch fused Adam's; compiled (``fused=True``) >= 0.9, SGLD (whose noise is made in the loop) >= 0.5.
GBPS_LIMITS = {(None, None): 0.8, (True, None): 0.9, (True, "sgld"): 0.5}


def _gbps_limit(fused, optimizer):
    return GBPS_LIMITS.get((fused, optimizer), GBPS_LIMITS[(fused, None)])


def mode_name(fused) -> str:
    return {None: "None", True: "True", False: "False"}[fused]


def _why(row, rows):
    """What the run itself says about a miss: is the mode any faster than the reference path?"""
    ref = next((r for r in rows if r["optimizer"] == row["optimizer"] and r["workload"] == row["workload"]
                and r["fused"] is False and r.get("ms")), None)
    if ref is not None and row["ms"] >= 0.9 * ref["ms"]:
        return f"no faster than the reference path (fused=False: {ref['ms']:.3g} ms)"
    return ""


def evaluate_targets(rows: list) -> dict:
    """Every target check on the optzoo rows; ``misses`` lists the failed ones."""
    checks = []
    for row in rows:
        if row["fused"] not in TARGET_MODES or row.get("error"):
            continue
        for key, (workloads, limit, text) in TARGETS.items():
            if row["workload"] not in workloads:
                continue
            value = {"gbps_vs_adam": row.get("vs_adam_gbps"), "time_vs_peer": row.get("vs_peer"),
                     "time_vs_adam": row.get("vs_adam_time"), "time_vs_adam_loaded": row.get("vs_adam_time"),
                     "lazy_vs_dense": row.get("vs_dense"), "lazy_vs_peer": row.get("vs_peer")}[key]
            if value is None:
                continue
            if limit is None:
                limit = _gbps_limit(row["fused"], row["optimizer"])
                text = text.format(limit=limit)
            met = value >= limit if key in ("gbps_vs_adam", "lazy_vs_dense") else value <= limit
            checks.append({"target": key, "text": text, "workload": row["workload"], "optimizer": row["optimizer"],
                           "fused": row["fused"], "value": value, "limit": limit, "met": met,
                           "why": "" if met else _why(row, rows)})
    return {"checks": len(checks), "met": sum(c["met"] for c in checks),
            "misses": [c for c in checks if not c["met"]]}


# ---------------------------------------------------------------------- formatting
def _f(x, digits=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if abs(x) >= 10 ** digits:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}" if abs(x) < 1 else f"{x:.{max(digits - len(str(int(abs(x)))), 0)}f}"


def _scheduled(results, workload):
    return results["workloads"][workload].get("scheduled", workload == "scheduled")


def _table(results, workload):
    """One row per optimizer and fused mode. The loaded and scheduled workloads have no peers (their reference is
    fused Adam under the same load, or with the same scheduler) and show their target's ratio, x Adam time."""
    paired_only = bool(results["workloads"][workload].get("load")) or _scheduled(results, workload)
    peers_on = results["config"]["peers"] and not paired_only
    mx_on = bool(results["mxnet"].get("version")) and not paired_only
    head = ["optimizer", "fused", "B/elt", "first call ms", "ms/step", "GB/s", "x Adam GB/s"]
    head += ["x Adam time"] if paired_only else []
    head += ["torch peer", "peer ms", "x peer time"] if peers_on else []
    head += ["MXNet ms", "x MXNet time"] if mx_on else []
    peers = {p["optimizer"]: p for p in results["peers"] if p["workload"] == workload}
    body = []
    for r in (r for r in results["rows"] if r["workload"] == workload):
        line = [r["optimizer"], mode_name(r["fused"]), _f(r.get("bytes_per_element"))]
        if r.get("error"):
            line += ["error: " + r["error"][:60], "-", "-", "-"] + (["-"] if paired_only else [])
        else:
            line += [_f(r.get("first_ms")), _f(r.get("ms")), _f(r.get("gbps")), _f(r.get("vs_adam_gbps"), 2)]
            line += [_f(r.get("vs_adam_time"), 2)] if paired_only else []
        if peers_on:
            peer = peers.get(r["optimizer"])
            line += [f"{peer['class']} ({peer['variant']})" if peer and not peer.get("error") else "-",
                     _f(peer.get("ms")) if peer else "-", _f(r.get("vs_peer"), 2)]
        if mx_on:
            mx = r.get("mxnet") or {}
            line += [_f(mx["ms"]) if "ms" in mx else ("error" if mx.get("error") else "-"), _f(r.get("vs_mxnet"), 2)]
        body.append(line)
    return head, body


def _embedding_table(e):
    """The embedding's rows: the lazy step, the dense step of the same table, torch's sparse peer, and what one lazy
    step allocates (its peak beyond what was held before, against the table's size)."""
    head = ["optimizer", "first call ms", "lazy ms/step", "dense ms/step", "x dense", "torch peer", "peer ms",
            "x peer time", "lazy step alloc KiB"]
    body = []
    for r in e["results"]:
        if r.get("error"):
            body.append([r["optimizer"], "error: " + r["error"][:60]] + ["-"] * (len(head) - 2))
            continue
        alloc = r.get("alloc")
        body.append([r["optimizer"], _f(r.get("first_ms")), _f(r.get("ms")), _f(r.get("dense_ms")),
                     _f(r.get("vs_dense")), (r.get("peer") or "-").replace("torch.optim.", ""), _f(r.get("peer_ms")),
                     _f(r.get("vs_peer"), 2), _f(alloc["peak"] / 1024) if alloc else "-"])
    return head, body


def _embedding_line(e):
    return (f"{e['touched']:,} distinct rows of {e['rows']:,} per step, the same coalesced sparse COO gradient "
            f"every step; table {e['table_bytes'] / 2 ** 20:,.0f} MiB; x dense = dense ms / lazy ms (> 1 is faster); "
            "x peer time = the median ratio of the lazy step to torch's step timed right before it (< 1 is faster)")


def _baseline_line(results, key):
    w = results["workloads"][key]
    b = w.get("baseline") or {}
    if "ms" not in b:
        return f"torch fused Adam: {b.get('error', 'not measured')}"
    load = w.get("load")
    under = (f" under the same load ({load['processes']} busy processes, {load['spinning_at_end']} still spinning "
             "at the end; x Adam time = the paired ratio r)") if load else ""
    if _scheduled(results, key):
        under += " with the same LambdaLR (x Adam time = the paired ratio r)"
    control = w.get("control_ratio")
    spread = (f"; paired against another instance of itself: r = {_f(control)} (an ideal row's ratio: how far "
              "it lies from 1 is the pairing's own spread)") if control else ""
    return (f"torch.optim.Adam(fused=True){under}: {_f(b['ms'])} ms/step, {_f(b['gbps'])} GB/s "
            f"({_f(b['bytes_per_element'])} B/elt), first call {_f(b['first_ms'])} ms{spread}")


def _device_line(results):
    """The device and its copy roofline, for runs off the CPU (older results have neither)."""
    d = results.get("device") or {}
    if d.get("type", "cpu") == "cpu":
        return None
    name = f" ({d['name']}, {d['memory_gib']} GiB, {d['multiprocessors']} SMs, CUDA {d['cuda']})" if "name" in d else ""
    c = results.get("copy")
    copy = (f"; copy dst.copy_(src), {c['bytes'] / 2 ** 20:,.0f} MiB fp32, GB/s = 2 x bytes / time ({c['timer']}): "
            f"{_f(c['gbps'])} GB/s (best {_f(c['best_gbps'])})") if c else ""
    return f"device: {d['device']}{name}{copy}"


def text_report(results) -> str:
    out = [f"optzoo benchmark  {results['machine']['cpu']}, {results['machine']['cores']} cores, "
           f"torch {results['machine']['torch']} ({results['machine']['torch_threads']} threads)",
           *filter(None, [_device_line(results)]), _triad_line(results), _load_line(results), ""]
    for key, w in results["workloads"].items():
        out += [w["describe"], "  " + _baseline_line(results, key)]
        head, body = _table(results, key)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        left = [h in ("optimizer", "torch peer") for h in head]
        for line in [head] + body:
            out.append("  " + "  ".join(str(x).ljust(wd) if left[i] else str(x).rjust(wd)
                                         for i, (x, wd) in enumerate(zip(line, widths))))
        out.append("")
    e = results.get("embedding")
    if e:
        out += [e["describe"], "  " + _embedding_line(e)]
        head, body = _embedding_table(e)
        widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
        for line in [head] + body:
            out.append("  " + "  ".join(str(x).ljust(wd) if i in (0, 5) else str(x).rjust(wd)
                                         for i, (x, wd) in enumerate(zip(line, widths))))
        out.append("")
    out += _targets_lines(results, markdown=False)
    out.append(f"total run time: {results['total_s']:.0f} s")
    return "\n".join(out)


def _load_line(results):
    load = results.get("load_average") or {}
    return (f"1-min load average per core: {load.get('start')} at the start (other work: ~0 on a quiet machine), "
            f"{load.get('end')} at the end (this run's threads included)")


def _triad_line(results):
    t = results["triad"]
    parts = [f"{name}: {_f(v['gbps'])} GB/s (best {_f(v['best_gbps'])})" for name, v in t.items()]
    return f"triad a += s*b, fp32, {t['start']['elements']:,} elements, 12 B/elt: " + "; ".join(parts)


def _targets_lines(results, markdown):
    """The misses, grouped by target, workload and mode: ``optimizer value`` lists."""
    t = results["targets"]
    lines = [("## Targets" if markdown else "targets") + f": {t['met']} of {t['checks']} checks met"
             + (f" (fused modes {', '.join(mode_name(m) for m in TARGET_MODES)}; misses below)"
                if t["misses"] else "")]
    groups = {}
    for c in t["misses"]:
        groups.setdefault((c["text"], c["workload"], mode_name(c["fused"])), []).append(c)
    if markdown and groups:
        lines += ["", "| target | workload | fused | missed by (optimizer: value) |", "|---|---|---|---|"]
    for (text, workload, mode), misses in groups.items():
        listed = ", ".join(f"{c['optimizer']} {_f(c['value'], 2)}" + (f" ({c['why']})" if c["why"] else "")
                           for c in misses)
        lines.append(f"| {text} | {workload} | {mode} | {listed} |" if markdown
                     else f"  MISS {text}, {workload}, fused={mode}: {listed}")
    return lines


def markdown_report(results) -> str:
    m = results["machine"]
    out = ["# optzoo benchmark: latest run", "",
           f"`python -m optzoo.bench {' '.join(results['config']['argv'])}`".replace(" `", "`"), "",
           f"- machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
           f"Python {m['python']}, optzoo {m['optzoo']} ({m['git'] or 'no git'}), {results['started']}",
           f"- total run time: {results['total_s']:.0f} s",
           *[f"- {line}" for line in filter(None, [_device_line(results)])],
           f"- {_triad_line(results)}",
           f"- {_load_line(results)}",
           f"- peers: torch.optim {m['torch']}; pytorch-optimizer: {results['pytorch_optimizer']}; "
           f"MXNet: {results['mxnet'].get('version') or results['mxnet'].get('status')}",
           "- ms = median step time; first call = the first step() in this process (state creation; compilation "
           "for fused=True, from whatever inductor cache the machine has: `--first-call` times it cold and warm); "
           "GB/s = bytes moved (B/elt x elements) / ms; x Adam GB/s = (B/elt / Adam's 28) / r, where r is the "
           "median ratio of this step's time to torch fused Adam's step timed right before it, on the same "
           "workload (> 1 is faster); x Adam time = r (loaded and scheduled workloads: both under the same load, or "
           "with the same scheduler, < 1 is faster); x peer time = r / the peer's own r (< 1 is faster): ratios from "
           "back-to-back steps, robust to the machine's drifting speed, so they need not equal ms / peer ms; "
           "x MXNet time = ms / MXNet's ms (separate process, < 1 is faster)", ""]
    for key, w in results["workloads"].items():
        out += [f"## {w['describe']}", "", _baseline_line(results, key), ""]
        head, body = _table(results, key)
        out += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(x) for x in line) + " |" for line in body]
        out.append("")
    e = results.get("embedding")
    if e:
        head, body = _embedding_table(e)
        out += [f"## {e['describe']}", "", _embedding_line(e), "",
                "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        out += ["| " + " | ".join(str(x) for x in line) + " |" for line in body]
        out.append("")
    out += _targets_lines(results, markdown=True) + [""]
    out += ["## Bytes moved per element", "",
            "weight read + write, gradient read, every state tensor read + write (fp32 master copy included "
            "under multi_precision), each at its dtype; one 4096 x 4096 tensor", "",
            "| optimizer | fp32 | fp16 + multi_precision |", "|---|---|---|"]
    for label, b in results["bytes_per_element"].items():
        out.append(f"| {label} | {_f(b['float32'], 4)} | {_f(b['float16_mp'], 4)} |")
    peers = {}
    for p in results["peers"]:
        peers.setdefault(p["optimizer"], p)
    if peers:
        out += ["", "## Peers", "", "| optimizer | peer | arguments | math |", "|---|---|---|---|"]
        for label, p in peers.items():
            out.append(f"| {label} | {p['library']}.{p['class']} ({p['variant']}) | "
                       f"{', '.join(f'{k}={_arg(v)}' for k, v in p['kwargs'].items())} | {p['math']} |")
    return "\n".join(out) + "\n"


def _arg(v):
    return tuple(v) if isinstance(v, list) else v  # betas: a tuple, also when read back from JSON


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_results(results, out_dir) -> tuple:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out / "latest.json", out / "latest.md"
    json_path.write_text(json.dumps(_jsonable(results), indent=1) + "\n")
    md_path.write_text(markdown_report(results))
    return json_path, md_path


def update_readme(path, results) -> None:
    """Replace the text between ``README_START`` and ``README_END`` in ``path`` with the latest report."""
    path = Path(path)
    text = path.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{path} has no {README_START} ... {README_END} markers to put the latest table between")
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    body = markdown_report(results).replace("# optzoo benchmark: latest run", "### Latest run", 1)
    body = body.replace("\n## ", "\n#### ")
    path.write_text(f"{head}{README_START}\n{body}{README_END}{tail}")
