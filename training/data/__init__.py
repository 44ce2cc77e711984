"""Images and captions on disk: scanning, buckets, crops and augmentation, held-out split."""
