"""onnxruntime execution providers: pick one, and say so once when an accelerator does not start."""
from __future__ import annotations

import logging
from collections.abc import Sequence
from os import PathLike

logger = logging.getLogger("instantfamily.faces")

PROVIDER_CHOICES: tuple[str, ...] = ("auto", "CPU", "CUDA", "ROCm", "CoreML", "DirectML")

ORT_NAMES: dict[str, str] = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}

# What to install for each accelerator (the CPU package shadows the GPU one when both are present).
_PACKAGE_HINT: dict[str, str] = {
    "CUDA": "pip uninstall onnxruntime && pip install onnxruntime-gpu",
    "ROCm": "install onnxruntime-rocm (AMD's build) and remove onnxruntime",
    "CoreML": "use the standard onnxruntime wheel on macOS",
    "DirectML": "pip uninstall onnxruntime && pip install onnxruntime-directml",
}

_warned: set[str] = set()


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def resolve_providers(choice: str = "auto", available: Sequence[str] | None = None) -> list[str]:
    """Provider list for onnxruntime: ``auto`` = CUDA when installed, else CPU; CPU always last."""
    avail = list(available) if available is not None else available_providers()
    if choice == "auto":
        if ORT_NAMES["CUDA"] in avail:
            return [ORT_NAMES["CUDA"], ORT_NAMES["CPU"]]
        return [ORT_NAMES["CPU"]]
    if choice not in ORT_NAMES:
        raise ValueError(f"provider: {choice!r} is not one of {', '.join(PROVIDER_CHOICES)}")
    name = ORT_NAMES[choice]
    if name not in avail:
        have = ", ".join(k for k, v in ORT_NAMES.items() if v in avail) or "none"
        raise ValueError(
            f"provider: {choice} is not available in this onnxruntime (it offers: {have}). "
            f"To use it: {_PACKAGE_HINT.get(choice, 'install a matching onnxruntime build')}; "
            "or choose 'auto' or 'CPU'."
        )
    return [name] if choice == "CPU" else [name, ORT_NAMES["CPU"]]


def _warn_once(provider: str, detail: str) -> None:
    if provider in _warned:
        return
    _warned.add(provider)
    short = next((k for k, v in ORT_NAMES.items() if v == provider), provider)
    logger.warning(
        "InstantFamily faces: %s was requested but did not start (%s); running face models on CPU. "
        "Check that the CUDA/cuDNN versions match your onnxruntime-gpu build; this is said once.",
        short,
        detail,
    )


def create_session(model: str | PathLike | bytes, providers: Sequence[str]):
    """An onnxruntime InferenceSession on ``providers``; falls back to CPU with one clear warning.

    onnxruntime itself silently (or with a C++ log line) drops a provider it cannot start; we compare
    what was asked with what the session got so the user learns why the GPU is idle.
    """
    import onnxruntime as ort

    model_arg = model if isinstance(model, bytes) else str(model)
    providers = list(providers)
    try:
        session = ort.InferenceSession(model_arg, providers=providers)
    except Exception as exc:  # noqa: BLE001 - any provider failure: retry on CPU, real model errors re-raise there
        if providers == [ORT_NAMES["CPU"]]:
            raise
        # If CPU fails too the model itself is bad: raise that error, not a provider warning.
        session = ort.InferenceSession(model_arg, providers=[ORT_NAMES["CPU"]])
        _warn_once(providers[0], f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
        return session
    got = session.get_providers()
    if providers and providers[0] != ORT_NAMES["CPU"] and providers[0] not in got:
        _warn_once(providers[0], f"onnxruntime gave {', '.join(got)}")
    return session


def session_device(session) -> str:
    """Short name of the provider a session really runs on (for logs and the loader's summary)."""
    first = session.get_providers()[0]
    return next((k for k, v in ORT_NAMES.items() if v == first), first)
