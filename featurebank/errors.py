"""Every error featurebank raises on purpose.

Each one also subclasses the builtin it means, so ``except KeyError`` or
``except ValueError`` in user code keeps working (the httpx pattern)::

    FeaturebankError
    ├── UnknownBackboneError      (KeyError)    backbone name not in the registry
    ├── UnknownLayerError         (KeyError)    layer name not in the backbone
    ├── UnknownTensorError        (KeyError)    tensor name not in an ONNX graph
    ├── WeightsMismatchError      (ValueError)  checkpoint keys/shapes do not fit the network
    ├── WeightsNotFoundError      (FileNotFoundError)  weights file or hub download unavailable
    ├── ExportParityError         (ValueError)  exported ONNX disagrees with the source model
    ├── NotOnnxModelError         (ValueError)  file is not a readable ONNX model
    ├── ModelCardError            (ValueError)  ONNX file lacks or has a broken featurebank card
    ├── FingerprintMismatchError  (ValueError)  vectors/classifier from another model
    ├── ActivationSpaceError      (ValueError)  a space of activation maps used where embeddings are needed
    ├── ImageDecodeError          (ValueError)  an image cannot be decoded
    │   └── ImageTooLargeError                  more pixels than max_pixels allows (size and cap as attributes)
    ├── ImageSourceError          (ValueError)  an image folder or list file is missing or malformed
    ├── StoreError                (RuntimeError) the embedding store is unusable or corrupt
    ├── ProviderError             (RuntimeError) requested execution provider is not active
    ├── ClassifierFileError       (ValueError)  a saved classifier cannot be loaded safely
    ├── IndexFileError            (ValueError)  a saved similarity index is missing parts or corrupt
    ├── UnknownIdError            (KeyError)    id not present in a similarity index
    ├── ClusterError              (RuntimeError) Ray missing, cluster unreachable, or a node cannot see the store
    ├── FineTuneError             (ValueError)  fine-tuning cannot run: unsupported network, bad labels, foreign checkpoint
    │   └── TrainingDivergedError               the loss became NaN/inf: the learning rate diverged
    ├── QuantizationError         (ValueError)  INT8 quantization cannot run: too few calibration images, unknown node
    │   └── QuantizationGateError               the INT8 model missed a gate (feature cosine, neighbours, speed)
    └── KernelClassError          (RuntimeError) an INT8 model opened on a CPU of another integer-kernel class

The CLI turns any ``FeaturebankError`` into a one-line message and exit code 2.
"""

from __future__ import annotations

__all__ = [
    "FeaturebankError",
    "UnknownBackboneError",
    "UnknownLayerError",
    "UnknownTensorError",
    "WeightsMismatchError",
    "WeightsNotFoundError",
    "ExportParityError",
    "NotOnnxModelError",
    "ModelCardError",
    "FingerprintMismatchError",
    "ActivationSpaceError",
    "ImageDecodeError",
    "ImageTooLargeError",
    "ImageSourceError",
    "StoreError",
    "ProviderError",
    "ClassifierFileError",
    "IndexFileError",
    "UnknownIdError",
    "ClusterError",
    "FineTuneError",
    "TrainingDivergedError",
    "QuantizationError",
    "QuantizationGateError",
    "KernelClassError",
]


class FeaturebankError(Exception):
    """Base class of every error featurebank raises deliberately."""


class _KeyErrorMessage(KeyError):
    # KeyError.__str__ quotes its argument (repr); our messages are sentences.
    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class UnknownBackboneError(FeaturebankError, _KeyErrorMessage):
    """The backbone name is not registered; the message lists the closest names."""


class UnknownLayerError(FeaturebankError, _KeyErrorMessage):
    """The layer is not one the backbone can be cut at; the message lists valid ones."""


class UnknownTensorError(FeaturebankError, _KeyErrorMessage):
    """The tensor does not exist in the ONNX graph."""


class WeightsMismatchError(FeaturebankError, ValueError):
    """A checkpoint does not fit the network: missing, unexpected or misshapen keys."""


class WeightsNotFoundError(FeaturebankError, FileNotFoundError):
    """Weights could not be found locally nor downloaded."""


class ExportParityError(FeaturebankError, ValueError):
    """The exported ONNX model does not reproduce the source model within tolerance."""


class NotOnnxModelError(FeaturebankError, ValueError):
    """The file is missing, unreadable or not an ONNX model."""


class ModelCardError(FeaturebankError, ValueError):
    """The ONNX model has no featurebank card, or the card is invalid."""


class FingerprintMismatchError(FeaturebankError, ValueError):
    """Vectors or a classifier come from a different model than the one in use."""


class ActivationSpaceError(FeaturebankError, ValueError):
    """A store space (or model output) holds unpooled activation maps cached for fine-tuning,
    not embeddings, so it cannot be indexed, searched, exported or used to train a classifier."""


class ImageDecodeError(FeaturebankError, ValueError):
    """An image file cannot be decoded (corrupt, unsupported, too large ...)."""


class ImageTooLargeError(ImageDecodeError):
    """An image has more pixels than the caller allows; refused before any pixel is decoded.

    Attributes: ``pixels`` (int, or None where Pillow refused before the size was known),
    ``size`` ((width, height), or None likewise) and ``max_pixels`` (the cap that was exceeded).
    """

    def __init__(self, message: str, *, pixels: int | None = None, size: tuple[int, int] | None = None,
                 max_pixels: int | None = None) -> None:
        # defaults, so that pickling (Ray moves errors between processes) can call cls(message)
        super().__init__(message)
        self.pixels, self.size, self.max_pixels = pixels, size, max_pixels


class ImageSourceError(FeaturebankError, ValueError):
    """An image source (folder, .txt/.csv/.parquet list) is missing, empty or malformed."""


class StoreError(FeaturebankError, RuntimeError):
    """The embedding store is unusable, locked, or corrupt."""


class ProviderError(FeaturebankError, RuntimeError):
    """The requested onnxruntime execution provider is not the one running."""


class ClassifierFileError(FeaturebankError, ValueError):
    """A saved classifier is corrupt, untrusted, or of an unknown format version."""


class IndexFileError(FeaturebankError, ValueError):
    """A saved similarity index directory is incomplete, inconsistent, or of an unknown format."""


class UnknownIdError(FeaturebankError, _KeyErrorMessage):
    """An id (content key or path) is not present in the similarity index."""


class ClusterError(FeaturebankError, RuntimeError):
    """Distributed embedding cannot run: Ray is not installed, the cluster cannot be reached,
    or a worker node cannot see the store or the inputs."""


class FineTuneError(FeaturebankError, ValueError):
    """Fine-tuning cannot run as asked: a network it cannot split, labels that do not fit the
    head, or a checkpoint folder written by another recipe or network."""


class TrainingDivergedError(FineTuneError):
    """The training loss became NaN or infinite: the learning rate diverged. The last good
    checkpoint is kept."""


class QuantizationError(FeaturebankError, ValueError):
    """INT8 quantization cannot run as asked: too few distinct calibration images to keep the
    gate images apart, an unknown calibration method, a node name the graph lacks."""


class QuantizationGateError(QuantizationError):
    """The quantized model missed a gate measured on held-out images (feature cosine to fp32,
    nearest-neighbour agreement, or speed); nothing was written. ``misses`` lists
    ``(gate, measured, threshold)``."""

    def __init__(self, message: str, *, misses: tuple[tuple[str, float, float], ...] = ()) -> None:
        super().__init__(message)
        self.misses = tuple(misses)


class KernelClassError(FeaturebankError, RuntimeError):
    """An INT8 model was quantized and gated on a CPU whose integer kernels differ from this
    one's (e.g. AVX2 without VNNI vs AVX-512 VNNI), so its vectors would differ here."""
