"""`python tests/llama_server.py ARGS`: llama-cpp-python's OpenAI-compatible server
(`python -m llama_cpp.server ARGS`) with llama.cpp's extra weight buffers turned off.

Why: on a CPU that reports AMX, llama.cpp repacks quantised weights into its AMX buffer and runs
AMX tile instructions; a virtual machine that reports AMX without enabling its register state
kills the server at the first request (a general protection fault at `ldtilecfg` in
libggml-cpu). Without the extra buffers the plain CPU kernels run: same answers, everywhere.
llama-cpp-python has no option for it, so the model's default parameters are patched here.
"""

from __future__ import annotations

import runpy
import sys


def plain_cpu_kernels() -> None:
    """Every llama_cpp.Llama created after this call loads its weights without extra buffer types."""
    import llama_cpp.llama as llama

    default = llama.llama_cpp.llama_model_default_params
    if getattr(default, "plain_cpu", False):
        return

    def params():
        p = default()
        p.use_extra_bufts = False
        return p

    params.plain_cpu = True
    llama.llama_cpp.llama_model_default_params = params


if __name__ == "__main__":
    plain_cpu_kernels()
    sys.argv = ["llama_cpp.server", *sys.argv[1:]]
    runpy.run_module("llama_cpp.server", run_name="__main__")
