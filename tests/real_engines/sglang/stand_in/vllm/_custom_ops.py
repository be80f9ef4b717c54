"""Test-only stand-in for ``vllm._custom_ops.rotary_embedding``.

On a device that is neither CUDA nor sglang's own CPU engine (``SGLANG_USE_CPU_ENGINE=1``, which
needs sgl-kernel's CPU build), sglang 0.5.23's ``RotaryEmbedding.__init__`` imports this kernel
binding from vLLM as its fallback kernel. On ``device="cpu"`` the rotary layer then runs sglang's
own ``forward_native``, so the binding is imported and never called: this stand-in raises if it
ever is, so a release that starts calling it fails the tests instead of computing something else.
"""


def rotary_embedding(*args, **kwargs):
    raise NotImplementedError(
        "test stand-in for vllm._custom_ops.rotary_embedding was called: sglang took a path the "
        "real-engine tests do not expect"
    )
