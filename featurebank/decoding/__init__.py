"""Decoding: image files and bytes to the uint8 pixels a network sees.

Opening image files safely, decoding, preprocessing driven by the model card
(:mod:`featurebank.decoding.decode`) and the one list of accepted formats
(:mod:`featurebank.decoding.formats`). Upstream of both export and the embedder: it imports
Pillow, numpy and :mod:`featurebank.artifact`, never onnxruntime, torch or the store.

>>> from featurebank.decoding import decode_image, to_model_input   # doctest: +SKIP
"""

from featurebank.decoding.decode import DEFAULT_MAX_PIXELS, ImageSource, decode_image, to_model_input
from featurebank.decoding.formats import ACCEPTED_FORMATS, IMAGE_EXTENSIONS

__all__ = ["ACCEPTED_FORMATS", "DEFAULT_MAX_PIXELS", "IMAGE_EXTENSIONS", "ImageSource", "decode_image", "to_model_input"]
