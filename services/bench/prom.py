"""Reading a server's own Prometheus counters, to check the load generator against them."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

#: counters of states served, tried in order: our teacher (by model label), our router
STATE_COUNTERS = ("opd_teacher_states", "opd_router_states")


def states_counter(text: str, model: str) -> float | None:
    """The states-served counter in a ``/metrics`` page, or ``None`` if it has none.

    A teacher's counter is labelled by model (only ``model``'s samples count); the router's has
    one unlabelled sample. A declared counter without samples (fresh server) reads 0.
    """
    found: dict[str, float] = {}
    wanted = {f"{name}_total": name for name in STATE_COUNTERS}
    for family in text_string_to_metric_families(text):
        if family.name in STATE_COUNTERS:
            # A labelled counter shows its HELP/TYPE lines but no sample until first used:
            # a fresh server has served 0 states, not an unknown number.
            found.setdefault(family.name, 0.0)
        # Match samples, not families: how the parser groups them depends on HELP/TYPE lines.
        for sample in family.samples:
            name = wanted.get(sample.name)
            if name is None or sample.labels.get("model", model) != model:
                continue
            found[name] = found.get(name, 0.0) + sample.value
    for name in STATE_COUNTERS:
        if name in found:
            return found[name]
    return None


async def scrape_states(
    client: httpx.AsyncClient, metrics_url: str | None, model: str
) -> float | None:
    """``states_counter`` of ``metrics_url``; ``None`` when unset, unreachable or absent."""
    if not metrics_url:
        return None
    try:
        r = await client.get(metrics_url)
    except httpx.HTTPError:
        return None
    return states_counter(r.text, model) if r.status_code == 200 else None
