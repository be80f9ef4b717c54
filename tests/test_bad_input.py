"""Bad input never reaches the engine: whatever the batch looks like, a label comes out, nothing
raises from the instrumentation, and the forward's result and exceptions are unchanged."""

from __future__ import annotations

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import sglang_fakes as fakes
from otel_stepspan.integrations import sglang

LABEL = re.compile(r"^step\[[a-z0-9_]+( [a-z]+=(\d+|\?))*\]$")


class Raising:
    """An attribute whose every use raises."""

    def __getattr__(self, name):
        raise RuntimeError(f"no {name}")


class RaisingName:
    @property
    def name(self):
        raise KeyError("name")


values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.lists(st.one_of(st.integers(-5, 10**12), st.none(), st.text(max_size=2)), max_size=6),
    st.builds(fakes.GpuTensor),
    st.builds(Raising),
)
modes = st.one_of(
    st.sampled_from(list(fakes.ForwardMode) + list(fakes.OldForwardMode)),
    st.text(max_size=12),
    st.integers(),
    st.none(),
    st.builds(RaisingName),
)
FIELDS = ("batch_size", "extend_num_tokens", "extend_seq_lens_cpu", "spec_info", "seq_lens_cpu")


@st.composite
def batches(draw):
    if draw(st.booleans()):
        return draw(st.one_of(st.none(), st.integers(), st.text(max_size=4), st.builds(Raising)))
    batch = type("Batch", (), {})()
    if draw(st.booleans()):
        batch.forward_mode = draw(modes)
    for name in FIELDS:
        if draw(st.booleans()):
            setattr(batch, name, draw(values))
    return batch


@settings(max_examples=400, deadline=None)
@given(batches(), st.booleans())
def test_describe_always_labels_and_never_raises(batch, is_draft):
    fakes.GPU_READS.clear()
    info = sglang.describe(batch, is_draft_worker=is_draft)
    assert LABEL.match(info.label), info.label
    attrs = info.attributes()
    assert all(isinstance(v, int) for k, v in attrs.items() if k not in ("forward.mode", "forward.label"))
    assert fakes.GPU_READS == []


class Runner:
    def __init__(self, outcome):
        self.outcome = outcome
        self.forward_pass_id = "not an int"

    def forward(self, forward_batch, skip_attn_backend_init=None):
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


Runner.forward = sglang.traced_forward(Runner.forward)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches(), st.one_of(st.integers(), st.text(max_size=3), st.builds(lambda: ValueError("engine failed"))))
def test_forward_result_and_exceptions_pass_through_unchanged(memory_spans, batch, outcome):
    memory_spans.exporter.clear()
    runner = Runner(outcome)
    if isinstance(outcome, BaseException):
        with pytest.raises(ValueError) as raised:
            runner.forward(batch)
        assert raised.value is outcome
    else:
        assert runner.forward(batch) == outcome
    (span,) = memory_spans.spans()
    assert LABEL.match(span.name), span.name


@pytest.mark.parametrize(
    "key, value, field, default",
    [
        ("OTEL_STEPSPAN_MAX_PENDING", "-3", "max_pending", 65536),
        ("OTEL_STEPSPAN_TIMELINE_STEPS", "0", "max_steps", 500),
        ("OTEL_STEPSPAN_TIMELINE_SECONDS", "soon", "max_seconds", 10.0),
        ("OTEL_STEPSPAN_TIMELINE", "maybe", "enabled", True),
    ],
)
def test_a_bad_project_variable_is_named_in_a_problem_and_the_default_is_used(key, value, field, default):
    from otel_stepspan.settings import read_settings

    settings = read_settings({key: value})
    holder = settings if field == "max_pending" else settings.timeline
    assert getattr(holder, field) == default
    assert [p for p in settings.problems if p.startswith(f"{key}={value!r}")], settings.problems


def test_timeline_variables_are_read():
    from otel_stepspan.settings import read_settings

    timeline = read_settings(
        {"OTEL_STEPSPAN_TIMELINE": "off", "OTEL_STEPSPAN_TIMELINE_STEPS": "7", "OTEL_STEPSPAN_TIMELINE_SECONDS": "2.5"}
    ).timeline
    assert (timeline.enabled, timeline.max_steps, timeline.max_seconds) == (False, 7, 2.5)


@pytest.mark.parametrize(
    "lens, expected",
    [
        ([3, 1, 0], [3, 1, 0]),
        ([3, -1], None),
        ([3, 1.0], None),
        ([3, True], None),
        ([3, None], None),
        ([3, "1"], None),
        ((2, 5), [2, 5]),
        ([], []),
    ],
)
def test_a_cpu_length_list_is_taken_only_when_every_entry_is_a_count(lens, expected):
    from otel_stepspan.integrations._read import cpu_int_list

    assert cpu_int_list(lens) == expected
