"""ImageNet channel statistics (RGB, 0..255 scale): the normalisation every backbone weight file
expects, applied by the transforms and undone to draw panels."""
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
