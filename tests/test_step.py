"""The label grammar and the attribute table of docs/spans.md, from the pure core."""

from __future__ import annotations

import sys

import pytest

from otel_stepspan import UNKNOWN, StepInfo, engine_attributes
from otel_stepspan.step import normalize_mode, unknown_step

from span_schema import FORWARD_KEYS

KEYS = FORWARD_KEYS


@pytest.mark.parametrize(
    "info, label",
    [
        (StepInfo("idle", 0, 0, 0, 0, 0), "step[idle]"),
        (StepInfo("idle", 8, 0, 0, 0, 0), "step[idle]"),
        (StepInfo("decode", 4, 0, 4, 0, 4), "step[decode bs=4]"),
        (StepInfo("prefill", 2, 512, 0, 2, 512), "step[prefill bs=2 toks=512]"),
        (StepInfo("mixed", 8, 256, 4, 4, 260), "step[mixed bs=8 ext=256 dec=4]"),
        (StepInfo("verify", 3, 0, 3, 0, 12), "step[verify bs=3 toks=12]"),
        (StepInfo("draft", 5, 0, 0, 0, 5), "step[draft bs=5]"),
        (StepInfo("draft_extend", 2, 8, 0, 0, 8), "step[draft_extend bs=2]"),
        (StepInfo("split_prefill", 1, 100, 0, 1, 100), "step[split_prefill bs=1]"),
        (StepInfo("prefill", 2, None), "step[prefill bs=2 toks=?]"),
        (StepInfo("prefill", None, 7), "step[prefill bs=? toks=7]"),
        (StepInfo("mixed", 3, -5, None), "step[mixed bs=3 ext=? dec=?]"),
        (StepInfo("verify", 3, 0, 3, 0, None), "step[verify bs=3 toks=?]"),
        (unknown_step(), "step[unknown bs=?]"),
    ],
)
def test_label_grammar(info, label):
    assert info.label == label
    attrs = info.attributes()
    assert attrs["forward.label"] == label
    assert KEYS <= set(attrs)


def test_attributes_are_typed_and_unknown_counts_are_minus_one():
    attrs = StepInfo("prefill", 2, None, 0, 2, None, pass_id=41).attributes()
    assert attrs == {
        "forward.mode": "prefill",
        "forward.batch_size": 2,
        "forward.extend_tokens": UNKNOWN,
        "forward.decode_seqs": 0,
        "forward.prefill_seqs": 2,
        "forward.num_tokens": UNKNOWN,
        "forward.label": "step[prefill bs=2 toks=?]",
        "forward.pass_id": 41,
    }
    for key, value in attrs.items():
        assert isinstance(value, str if key in ("forward.mode", "forward.label") else int)
    assert "forward.pass_id" not in StepInfo("decode", 1).attributes()


def test_mode_label_is_low_cardinality():
    assert StepInfo("decode", 4).mode_label == "step[decode]"
    assert StepInfo("decode", 400).mode_label == "step[decode]"


@pytest.mark.parametrize(
    "raw, mode",
    [("TARGET_VERIFY", "target_verify"), ("Split Prefill", "split_prefill"), ("a]b[c", "a_b_c"), ("", "unknown")],
)
def test_normalize_mode_keeps_labels_one_token(raw, mode):
    assert normalize_mode(raw) == mode


@pytest.mark.parametrize(
    "prefill, ext, decode, expected",
    [
        (0, 0, 0, "step[idle]"),
        (2, 512, 0, "step[prefill bs=2 toks=512]"),
        (0, 0, 4, "step[decode bs=4]"),
        (4, 256, 4, "step[mixed bs=8 ext=256 dec=4]"),
    ],
)
def test_from_counts_picks_the_mode(prefill, ext, decode, expected):
    info = StepInfo.from_counts(prefill_seqs=prefill, extend_tokens=ext, decode_seqs=decode)
    assert info.label == expected
    assert info.num_tokens == ext + decode


def test_engine_attributes_keep_only_what_is_known():
    assert engine_attributes("sglang", 0, None, 1) == {"engine.name": "sglang", "engine.tp_rank": 0, "engine.pp_rank": 1}
    assert engine_attributes(None, True, -1, "2") == {}


def test_core_imports_neither_torch_nor_opentelemetry():
    import subprocess

    code = (
        "import sys, otel_stepspan.step, otel_stepspan.settings;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('torch','opentelemetry')];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
