"""Data: few-shot episodes of images and videos, their transforms, class indexes, the prepared
trees' readers, and the scoring of predictions against labels."""
