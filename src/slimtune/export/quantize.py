"""k-quants and the other llama.cpp types, made by llama.cpp's own quantizer.

    model ──► f16 GGUF (slimtune + gguf-py) ──► llama_model_quantize(f16, out, ftype) ──► out.gguf
                                                 (llama.cpp, through llama-cpp-python)

slimtune does not reimplement the k-quants: Q4_K_M is not one encoding but a recipe (llama.cpp's
`llama_tensor_get_type` keeps some attn_v / ffn_down tensors at Q6_K, falls back to Q5_0 or Q8_0
for rows that are not a multiple of 256, ...), and only llama.cpp's quantizer writes it as
llama.cpp and Ollama expect. It comes with the `llamacpp` extra (`pip install
'slimtune[llamacpp]'`); without it, asking for one of these types is one line saying so.

What llama.cpp's `quantize --help` lists for Llama-3-8B (file size, perplexity increase over
f16): q4_0 4.34G +0.4685, q4_k_m 4.58G +0.1754, q5_k_m 5.33G +0.0569,
q6_k 6.14G +0.0217, q8_0 7.96G +0.0026.
"""

from __future__ import annotations

from pathlib import Path

from slimtune.errors import SlimtuneError

# --dtype -> llama_ftype (include/llama.h, LLAMA_FTYPE_MOSTLY_*)
LLAMACPP_TYPES: dict[str, int] = {
    "q4_0": 2,
    "q4_1": 3,
    "q5_0": 8,
    "q5_1": 9,
    "q2_k": 10,
    "q3_k_s": 11,
    "q3_k_m": 12,
    "q3_k_l": 13,
    "q4_k_s": 14,
    "q4_k_m": 15,
    "q5_k_s": 16,
    "q5_k_m": 17,
    "q6_k": 18,
}
INSTALL_HINT = "pip install 'slimtune[llamacpp]' (llama-cpp-python; it builds llama.cpp)"


def needs_llamacpp(dtype: str) -> bool:
    """Whether `dtype` is made by llama.cpp's quantizer (not written by slimtune directly)."""
    return dtype in LLAMACPP_TYPES


def require_llamacpp(dtype: str) -> None:
    """One line naming the install command when llama-cpp-python is missing."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise SlimtuneError(
            f"--dtype {dtype} is made by llama.cpp's quantizer: {INSTALL_HINT}"
        ) from None


def quantize_gguf(source: Path, dest: Path, dtype: str, *, threads: int = 0) -> None:
    """Quantize the f16/f32 GGUF `source` into `dest` with `llama_model_quantize`.

    Args:
        source: a GGUF model llama.cpp can load (slimtune's f16 export).
        dest: the file to write (the caller renames it into place).
        dtype: a key of LLAMACPP_TYPES.
        threads: quantizer threads; 0 lets llama.cpp use every core.
    """
    require_llamacpp(dtype)
    import llama_cpp

    _quiet(llama_cpp)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMACPP_TYPES[dtype]
    params.nthread = threads
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(dest).encode(), llama_cpp.byref(params)
    )
    if status != 0:  # llama.cpp refused the file: a bug on our side, not the user's input
        raise RuntimeError(f"llama.cpp's quantizer failed on {source} ({dtype}), status {status}")


def _quiet(llama_cpp) -> None:
    """Send llama.cpp's log lines nowhere (its quantizer prints one per tensor)."""
    callback = llama_cpp.llama_log_callback(lambda level, text, user_data: None)
    _quiet.callback = callback  # keep a reference: ctypes would free it
    llama_cpp.llama_log_set(callback, llama_cpp.ctypes.c_void_p(0))
