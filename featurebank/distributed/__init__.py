"""Embedding on a Ray cluster into the same content-addressed store as the local embedder.

:func:`embed_images_ray` spreads the local pipeline's stages over a cluster (decode in Ray
tasks, inference in a pool of actors, each writing its own store shards), so every other
command (train, index, search, export) works on the result unchanged.

Each node needs:

* featurebank installed with the ``ray`` extra (``pip install 'featurebank[ray]'``), the same
  versions as the driver;
* the store directory on a filesystem every node mounts at the same path (NFS, Lustre, a
  cluster filesystem); the actors append shards to it (the driver alone writes its catalog);
* the inputs at the same paths (shared filesystem), or given as fsspec URLs
  (``s3://bucket/photos/``) with the fsspec backend (``s3fs``, ``gcsfs`` ...) and its
  credentials installed on every node.

The model file needs to be on the driver only: its bytes travel through Ray's object store
and each node keeps one copy in its temp directory. Ray itself is imported lazily, here
only: featurebank imports and runs without it.
"""

from featurebank.distributed.ray_embed import embed_images_ray

__all__ = ["embed_images_ray"]
