"""Data: CIFAR-10, image folders and the digits demo as arrays, and a batch loader
with the standard CIFAR augmentation.

    train_set = md.data.CIFAR10(train=True)             # or ImageFolder("cifar10.zip")
    mean, std = md.data.channel_mean_std(train_set.images)
    loader = md.data.DataLoader(train_set, 128, shuffle=True, drop_last=True,
                                augment=True, mean=mean, std=std, seed=0)
    for images, labels in loader: ...                    # float32 NCHW, int64
"""
from .datasets import (CIFAR10, CIFAR10_CLASSES, CIFAR10_MD5, CIFAR10_URL, DataError,
                       DataUnavailableError,
                       Digits, ImageDataset, ImageFolder, cache_dir, channel_mean_std,
                       cifar10_from_environment, imagenet_classes, open_datasets, parse_cifar10_binary)
from .loader import (DataLoader, augmentation_parameters, normalization_constants, normalize,
                     random_crop_flip)

__all__ = ["CIFAR10", "ImageFolder", "Digits", "ImageDataset", "DataLoader", "DataError", "DataUnavailableError",
           "channel_mean_std", "random_crop_flip", "normalize", "normalization_constants",
           "augmentation_parameters", "open_datasets", "cifar10_from_environment", "cache_dir", "parse_cifar10_binary",
           "CIFAR10_URL", "CIFAR10_MD5", "CIFAR10_CLASSES", "imagenet_classes"]
