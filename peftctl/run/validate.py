"""What `peftctl validate` finds beyond the recipe itself, without loading a weight or the data:
where the Hub model and datasets are (or what training would fetch), what the method trains
on the model, from the same weightless step training starts with (plan/skeleton.py), and where the
experiment trackers report (each installed, as training checks before the weights load).
"""

from __future__ import annotations

from peftctl.core.errors import blame
from peftctl.core.hub import is_hub_id
from peftctl.plan.skeleton import coverage_notes, describe_targets, method_on_skeleton
from peftctl.recipe.schema import Recipe
from peftctl.train.trackers import check_installed, describe


def findings(spec: Recipe) -> list[str]:
    """One line each: `source: ...` for every Hub model or dataset, `targets: ...`, `skipped: ...` and
    `experts: ...` for what the targets leave frozen (plan/skeleton.py's coverage_notes), and
    `trackers: ...` when train.report_to names any."""
    with blame(spec.source, spec.locate):
        check_installed(spec.train.report_to)
    trackers = describe(spec.train.report_to, spec.output.dir)
    found = method_on_skeleton(spec)
    return [*hub_sources(spec), f"targets: {describe_targets(found)}", *coverage_notes(found),
            *([f"trackers: {trackers}"] if trackers else [])]


def hub_sources(spec: Recipe) -> list[str]:
    """Where the recipe's Hub model and datasets are (cache) or what training would fetch; nothing
    is downloaded. Local models and data are not looked at here (training reads them first)."""
    data = spec.data
    hub_named = [value for value in (spec.model.name_or_path, data.train, data.validation)
                 if isinstance(value, str) and is_hub_id(value)]
    if not hub_named:
        return []
    from peftctl.data.rows import describe_hub_source as describe_data
    from peftctl.model.loading import describe_hub_source as describe_model

    with blame(spec.source, spec.locate):
        found = [describe_model(spec.model), describe_data(data.train, data, "data.train")]
        if data.validation != data.train:
            found.append(describe_data(data.validation, data, "data.validation"))
    return [f"source: {line}" for line in found if line]
