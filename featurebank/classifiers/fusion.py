def fuse_classifier(): pass
