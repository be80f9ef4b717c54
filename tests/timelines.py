"""The check that received step spans form engine timelines (see otel_stepspan.timeline), shared
by the tests of every engine."""

from __future__ import annotations

from otel_stepspan.testing.otlp_receiver import ReceivedSpan


def assert_steps_form_timelines(steps: list[ReceivedSpan], roots: list[ReceivedSpan]) -> None:
    """Each step is a child of a timeline root in the same trace; the windows hold every step
    once, count them by mode, cover their steps, and follow one another without overlapping."""
    by_id = {root.span_id: root for root in roots}
    assert by_id, "no timeline root arrived"
    members: dict[str, list[ReceivedSpan]] = {}
    for span in steps:
        root = by_id.get(span.parent_span_id)
        assert root is not None and root.trace_id == span.trace_id, f"{span.name} is outside every timeline"
        members.setdefault(root.span_id, []).append(span)
    for span_id, mine in members.items():
        root = by_id[span_id]
        assert root.attributes["timeline.steps"] == len(mine)
        for mode in {m.attributes["forward.mode"] for m in mine}:
            assert root.attributes[f"timeline.steps.{mode}"] == sum(
                1 for m in mine if m.attributes["forward.mode"] == mode
            )
        assert root.start_ns <= min(m.start_ns for m in mine) and max(m.end_ns for m in mine) <= root.end_ns
    ordered = sorted(by_id.values(), key=lambda r: r.start_ns)
    assert all(a.end_ns <= b.start_ns for a, b in zip(ordered, ordered[1:])), "timeline windows overlap"
    assert sum(len(m) for m in members.values()) == len(steps)
