"""featurebank.embedder: images to vectors with onnxruntime.

Sessions (:mod:`~featurebank.embedder.session`: providers, IO binding), the one decode ->
infer pair (:mod:`~featurebank.embedder.batches`: ``decode_batch``, ``infer_batch``,
``decode_ahead``), input listing (:mod:`~featurebank.embedder.sources`) and the doctor.
Embedding into a store is the join :mod:`featurebank.embed_into_store`; the scikit-learn
transformer is :mod:`featurebank.image_embedder`.
"""
