"""Compare: the same scenario, migrated once under each policy, side by side."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tqdm import tqdm

from dqmig.experiments import results, runner
from dqmig.experiments.scenario import Scenario


def run(
    scenario: Scenario,
    policies: list[str],
    *,
    argv: list[str],
    progress: bool = True,
    on_run: Callable[[dict[str, Any]], None] | None = None,
    desc: str | None = None,
) -> dict[str, Any]:
    """Runs the scenario under each policy in turn; returns the results document. `desc`:
    the progress bar's label (default 'compare SCENARIO')."""
    scenario.check_policies(policies)  # a policy that cannot run fails before any run starts
    doc = results.new("compare", scenario.to_dict(), policies, argv)
    with tqdm(policies, desc=desc or f"compare {scenario.name}", unit="run", disable=not progress) as bar:
        for policy in bar:
            bar.set_postfix_str(policy)
            doc["runs"].append(runner.run(scenario, policy))
            if on_run:
                on_run(doc)
    return doc
