"""``vitray data inspect``: what a packed dataset holds, and whether its shards are intact."""
from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from vitray import storage

from .class_mix import mix_warning, shard_mixes
from .formats import Manifest

__all__ = ["summarize", "verify"]


def summarize(folder: str) -> str:
    m = Manifest.read(folder)
    classes = f"{m.num_classes} classes" if m.class_names else "unlabeled"
    lines = [f"{storage.display(folder)}: task {m.task}, {classes}, format v{m.format_version}, "
             f"source {m.source.get('format')} {m.source.get('path', '')}"]
    total_bytes = sum(s.bytes for s in m.shards)
    lines.append(f"images: {sum(m.counts.values()):,} in {len(m.shards)} shards, {total_bytes / 2**20:,.1f} MiB")
    for split in m.splits:
        lines.append(f"  {split:<6} {m.counts[split]:>9,} images")
    from vitray.tasks import get_task

    counted = get_task(m.task, "data").load("data").counted
    lines.append(f"per class ({counted}):")
    width = max((len(n) for n in m.class_names), default=5)
    splits = m.splits
    lines.append("  " + " " * width + "".join(f" {s:>8}" for s in splits))
    for name in m.class_names:
        lines.append("  " + f"{name:<{width}}" + "".join(f" {m.class_counts.get(s, {}).get(name, 0):>8,}" for s in splits))
    order = m.order or {}
    lines.append("row order: " + (f"shuffled at pack (seed {order.get('seed')}, {order.get('method')})"
                                  if order.get("shuffled") else "source order" + (" (packed before vitray shuffled rows)"
                                                                                  if not order else "")))
    mixes = shard_mixes(folder, m)
    lines.append("shards (class mix: distance to the split's; far when above the limit that random sampling allows):")
    fw = max((len(x.file) for x in mixes), default=4)
    for x in mixes:
        total = sum(x.counts.values()) or 1
        top = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(x.counts.items(), key=lambda kv: -kv[1])[:3])
        judged = ("not judged (class counts unknown)" if x.distance is None else
                  f"distance {x.distance:.2f}" + (" (too small to judge)" if x.limit is None else
                                                 f" / limit {x.limit:.2f}" + ("  FAR" if x.far else "")))
        lines.append(f"  {x.file:<{fw}} {x.rows:>8,} rows  {judged}" + (f"  top: {top}" if x.counts else ""))
    warning = mix_warning(mixes)
    if warning:
        lines.append(f"warning: {warning}")
    lines.append(f"skipped: {len(m.skipped)}")
    reasons: dict[str, int] = {}
    for s in m.skipped:
        reasons[s["reason"].split(":")[0]] = reasons.get(s["reason"].split(":")[0], 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {n:>6} {reason}")
    for s in m.skipped[:20]:
        lines.append(f"    {s['path']}: {s['reason']}")
    if len(m.skipped) > 20:
        lines.append(f"    ... and {len(m.skipped) - 20} more (manifest.json lists all)")
    return "\n".join(lines)


def verify(folder: str) -> list[str]:
    """Every shard's sha256 and row count against the manifest; returns the problems (empty: intact). ``folder`` is a
    local folder or an object store prefix."""
    m = Manifest.read(folder)
    problems = []
    present = {storage.basename(p) for p, _ in storage.list_files(folder)}
    for s in m.shards:
        path = storage.join(folder, s.file)
        if s.file not in present:
            problems.append(f"{s.file}: missing")
            continue
        # an object is fetched once (hash and footer from memory: one GET); a local file is streamed
        data = storage.read_bytes(path) if storage.is_uri(path) else None
        digest = hashlib.sha256(data).hexdigest() if data is not None else storage.sha256_of(path)
        if digest != s.sha256:
            problems.append(f"{s.file}: sha256 {digest[:12]}... != manifest {s.sha256[:12]}...")
        try:
            with (pa.BufferReader(data) if data is not None else storage.open_input(path)) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
        except Exception as err:  # noqa: BLE001 - a damaged footer is a finding, not a crash
            problems.append(f"{s.file}: not a readable Parquet file ({err})")
            continue
        if rows != s.rows:
            problems.append(f"{s.file}: {rows} rows != manifest {s.rows}")
    listed = {s.file for s in m.shards}
    for extra in sorted(n for n in present if n.endswith(".parquet") and n not in listed):
        problems.append(f"{extra}: shard not in the manifest")
    return problems
