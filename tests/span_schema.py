"""The step span's attribute keys (docs/spans.md), written out once for every test that checks a span against it
(spelled here by hand, not taken from the code under test)."""

#: On every step span, whatever the engine exposed.
FORWARD_KEYS = frozenset(
    {
        "forward.mode",
        "forward.batch_size",
        "forward.extend_tokens",
        "forward.decode_seqs",
        "forward.prefill_seqs",
        "forward.num_tokens",
        "forward.label",
    }
)
#: When the engine has a forward counter.
PASS_ID_KEY = "forward.pass_id"
#: When known.
ENGINE_KEYS = frozenset({"engine.name", "engine.tp_rank", "engine.dp_rank", "engine.pp_rank"})
