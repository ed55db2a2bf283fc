"""onnxruntime sessions for featurebank models: provider choice, threads, IO binding.

``device="auto"`` uses CUDA when onnxruntime can run it and the CPU otherwise, and says which
one runs. ``device="cuda"`` fails loudly (:class:`~featurebank.errors.ProviderError`) when
CUDA is not what runs: no silent fallback that changes speed by 20x without a word.

An INT8 model is opened only on a CPU of the integer-kernel class its card was gated on
(:mod:`featurebank._cpu`): the same u8s8 graph saturates on AVX2 without VNNI and not on a
VNNI host, so it would give other vectors. ``allow_kernel_mismatch=True`` (or the environment
variable ``FEATUREBANK_ALLOW_KERNEL_MISMATCH=1``) turns the refusal into a warning.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import onnxruntime as ort

from featurebank._cpu import cpu_kernel_class
from featurebank.artifact import QUANTIZED_PRECISIONS, ModelCard
from featurebank.embedder.devices import DEVICES
from featurebank.errors import KernelClassError, NotOnnxModelError, ProviderError

__all__ = ["ModelRunner", "check_model_file", "open_model", "physical_cores", "providers_for", "cuda_status", "check_kernel_class",
           "ALLOW_KERNEL_MISMATCH_ENV"]

#: Environment variable that, set to 1, makes an INT8 model on another CPU kernel class warn
#: instead of refusing (for every open_model call that does not say).
ALLOW_KERNEL_MISMATCH_ENV = "FEATUREBANK_ALLOW_KERNEL_MISMATCH"

log = logging.getLogger("featurebank")


def physical_cores() -> int:
    """Cores this process may use (affinity-aware)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@functools.lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str]:
    """(usable, reason): whether onnxruntime can really start its CUDA provider here.

    onnxruntime-gpu lists CUDAExecutionProvider even where no GPU or CUDA library is present;
    only creating a session tells. Done once per process on a one-node graph.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False, (
            f"this onnxruntime build offers only {', '.join(ort.get_available_providers())} "
            "(is plain onnxruntime installed over onnxruntime-gpu?)"
        )
    from onnx import TensorProto, helper

    node = helper.make_node("Identity", ["x"], ["y"])
    graph = helper.make_graph([node], "probe", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    probe.ir_version = 9  # old enough for any onnxruntime that supports opset 17
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    previous = 2
    ort.set_default_logger_severity(4)  # the CUDA loader logs its failure as an error otherwise
    try:
        sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        running = sess.get_providers()[0]
    except Exception as exc:  # pragma: no cover - depends on the machine
        return False, f"creating a CUDA session failed: {str(exc).splitlines()[0][:200]}"
    finally:
        ort.set_default_logger_severity(previous)
    if running != "CUDAExecutionProvider":
        return False, "onnxruntime-gpu is installed but CUDA did not start (no GPU, or CUDA 12/13 / cuDNN 9 libraries missing)"
    return True, "CUDA provider starts"


def check_kernel_class(card: ModelCard, path: str, *, allow_kernel_mismatch: bool | None = None) -> None:
    """Refuse (:class:`KernelClassError`) an INT8 model gated on a CPU of another kernel class.

    ``allow_kernel_mismatch`` : True to log a warning instead; None reads
    ``FEATUREBANK_ALLOW_KERNEL_MISMATCH`` (``1``/``true``/``yes``). Float models always pass.
    """
    if card.precision not in QUANTIZED_PRECISIONS:
        return
    gated_on, here = card.quantization.get("kernel_class"), cpu_kernel_class()
    if gated_on == here:
        return
    if allow_kernel_mismatch is None:
        allow_kernel_mismatch = os.environ.get(ALLOW_KERNEL_MISMATCH_ENV, "").strip().lower() in ("1", "true", "yes")
    message = (f"{path!r} is an {card.precision} model quantized and gated on a {gated_on} CPU, but this CPU is "
               f"{here}, whose integer kernels give other vectors")
    if allow_kernel_mismatch:
        log.warning("%s; running it anyway (allowed by allow_kernel_mismatch / %s)", message, ALLOW_KERNEL_MISMATCH_ENV)
        return
    raise KernelClassError(f"{message}: re-export it on this machine (featurebank export --precision int8 --calibrate "
                           f"SOURCE), or set {ALLOW_KERNEL_MISMATCH_ENV}=1 (allow_kernel_mismatch=True) to only warn")


def check_model_file(model: str | os.PathLike[str]) -> str:
    """``model`` as a str path, or :class:`NotOnnxModelError` when no file is there."""
    path = os.fspath(model)
    if not os.path.isfile(path):
        raise NotOnnxModelError(f"no model file at {path!r}; export one with `featurebank export -o {path}`")
    return path


def providers_for(device: str) -> list[str]:
    """The onnxruntime providers a session for ``device`` asks for, the one that will run
    first (``device="cuda"`` where CUDA cannot run raises :class:`ProviderError`)."""
    if device == "cpu":
        return ["CPUExecutionProvider"]
    usable, reason = cuda_status()
    if usable:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "cuda":
        raise ProviderError(f"--device cuda asked for, but CUDA cannot run here: {reason}; see `featurebank doctor`")
    return ["CPUExecutionProvider"]


@dataclass
class ModelRunner:
    """A loaded featurebank ONNX model: its card and one onnxruntime session.

    ``run(batch)`` takes the batch in the card's input format (uint8 NHWC or float32 NCHW)
    and returns one float32 array per output, ``{name: (N, dim)}``.
    Thread-safe: onnxruntime sessions may be run from several threads.
    """

    path: str
    card: ModelCard
    session: ort.InferenceSession
    provider: str
    output_names: list[str] = field(default_factory=list)
    threads: int = 0  # onnxruntime intra-op threads the session was opened with
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def on_cuda(self) -> bool:
        return self.provider == "CUDAExecutionProvider"

    def run(self, batch: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else self.output_names
        if self.on_cuda:
            # IO binding: the input is copied to the GPU once and outputs come back in place,
            # without onnxruntime's extra staging copies.
            binding = self.session.io_binding()
            binding.bind_cpu_input(self.card.input_name, np.ascontiguousarray(batch))
            for name in names:
                binding.bind_output(name, "cpu")
            self.session.run_with_iobinding(binding)
            values = binding.copy_outputs_to_cpu()
        else:
            values = self.session.run(names, {self.card.input_name: batch})
        return {n: np.asarray(v, dtype=np.float32) for n, v in zip(names, values)}


def open_model(
    model: str | os.PathLike[str],
    *,
    device: str = "auto",
    threads: int | None = None,
    spin: bool = False,
    allow_kernel_mismatch: bool | None = None,
) -> ModelRunner:
    """Open a featurebank ONNX model for inference.

    Parameters
    ----------
    model : path of an ONNX file written by ``featurebank export`` or ``featurebank cut``
    device : ``auto`` (CUDA if available, else CPU), ``cpu`` or ``cuda`` (error if unavailable)
    threads : intra-op threads; default all cores this process may use
    spin : let onnxruntime's threads busy-wait between ops. Off by default: the decode
        workers share the cores, and spinning threads would steal their time.
    allow_kernel_mismatch : for an INT8 model gated on a CPU of another integer-kernel class:
        True warns, False refuses (:class:`~featurebank.errors.KernelClassError`), None (the
        default) refuses unless ``FEATUREBANK_ALLOW_KERNEL_MISMATCH=1``
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got device={device!r}")
    path = check_model_file(model)
    providers = providers_for(device)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    n_threads = int(threads) if threads else physical_cores()
    opts.intra_op_num_threads = n_threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        session = ort.InferenceSession(path, opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        raise NotOnnxModelError(f"onnxruntime cannot load {path!r}: {str(exc).splitlines()[0][:300]}") from None
    card = ModelCard.from_metadata(session.get_modelmeta().custom_metadata_map)
    check_kernel_class(card, path, allow_kernel_mismatch=allow_kernel_mismatch)
    running = session.get_providers()[0]
    if device == "cuda" and running != "CUDAExecutionProvider":
        raise ProviderError(
            f"--device cuda asked for, but onnxruntime runs {running} (CUDA failed to initialise: "
            "check the CUDA/cuDNN libraries with `featurebank doctor`)"
        )
    if device == "auto" and "CUDAExecutionProvider" in providers and running != "CUDAExecutionProvider":
        log.warning("CUDA is installed but onnxruntime could not start it; running on %s (see `featurebank doctor`)", running)
    names = [o.name for o in session.get_outputs()]
    missing = [o.name for o in card.outputs if o.name not in names]
    if missing:
        raise NotOnnxModelError(f"{path!r}: the model card names outputs {missing} that the graph lacks; re-export it")
    return ModelRunner(path=path, card=card, session=session, provider=running, output_names=[o.name for o in card.outputs],
                       threads=n_threads)
