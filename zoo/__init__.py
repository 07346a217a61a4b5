"""What a model is: sources (timm names, hf-hub:, local-dir:), families, block adapters.

Importing the package registers this project's own timm models (CIFAR ResNets, starter ViTs).
"""
from zoo import cifar_resnet  # noqa: F401  (registers cifar_resnet20/32/44/56 with timm)
from zoo import starter  # noqa: F401  (registers starter_vit_tiny/small/base with timm)
