"""From a folder or dataset to uint8 batches: sources, checks, decoding, augmentation, datasets, loaders."""
