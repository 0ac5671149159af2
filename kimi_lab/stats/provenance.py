"""Where a sweep's jobs came from: the data cache and the code commit each job recorded in results.json, and one
warning per field on which the jobs disagree (an arm difference could then be a data or code difference)."""

from __future__ import annotations

from kimi_lab.stats.collect import Sweep

PROVENANCE = {  # results.json field -> what a difference means
    "data_manifest_key": "different data (data_manifest_key): arm differences may be data differences",
    "git_commit": "different code (git_commit)",
}
NOT_RECORDED = "(not recorded)"


def provenance(sweep: Sweep) -> dict[str, dict[str, list[str]]]:
    """field of PROVENANCE -> recorded value -> job names, over the jobs that left results (completed, diverged)."""
    jobs = [j for j in sweep.jobs if j.status in ("completed", "diverged")]
    out: dict[str, dict[str, list[str]]] = {}
    for key in PROVENANCE:
        for job in jobs:
            out.setdefault(key, {}).setdefault(str(job.results.get(key) or NOT_RECORDED), []).append(job.name)
    return out


def provenance_warnings(sweep: Sweep) -> list[str]:
    """One line per PROVENANCE field on which the jobs disagree, listing each value and its jobs."""
    lines = []
    for key, values in provenance(sweep).items():
        if len(values) > 1:
            listed = "; ".join(f"`{v}`: {len(names)} job(s) ({', '.join(names[:8])}{', ...' * (len(names) > 8)})"
                               for v, names in values.items())
            lines.append(f"jobs ran on {PROVENANCE[key]}: {listed}")
    return lines
