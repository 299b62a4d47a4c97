"""The article's two networks; builders return uncompiled models that take raw 0-255 RGB."""

from __future__ import annotations

import keras
from keras import layers

VGG16_TOP_BLOCK = "block5"  # the convolutional block phase 2 unfreezes


def build_scratch(img_size: int) -> keras.Model:
    """The article's small CNN: conv 32-32-64, dropout 0.25, dense 64, dropout 0.5."""
    inputs = keras.Input((img_size, img_size, 3), name="image")
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (32, 32, 64):
        x = layers.Conv2D(filters, 3, padding="same", activation="relu")(x)
        x = layers.MaxPooling2D(2)(x)
    x = layers.Dropout(0.25)(x)
    x = layers.Flatten()(x)
    x = layers.Dense(64, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    # float32 output keeps the sigmoid and the loss stable under mixed precision.
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="p_dog")(x)
    return keras.Model(inputs, outputs, name="scratch")


def build_vgg16(img_size: int, weights: str | None) -> keras.Model:
    """VGG16 (frozen) with its own preprocessing inside and the article's dense head."""
    base = keras.applications.VGG16(
        include_top=False, weights=weights, input_shape=(img_size, img_size, 3)
    )
    base.trainable = False
    inputs = keras.Input((img_size, img_size, 3), name="image")
    # RGB -> BGR and ImageNet mean subtraction, as VGG16 was trained (not a 1/255 rescale).
    x = keras.applications.vgg16.preprocess_input(inputs)
    x = base(x, training=False)
    x = layers.Flatten()(x)
    x = layers.Dense(512, activation="relu")(x)
    x = layers.Dropout(0.5)(x)
    x = layers.Dense(256, activation="relu")(x)
    x = layers.Dropout(0.2)(x)
    outputs = layers.Dense(1, activation="sigmoid", dtype="float32", name="p_dog")(x)
    return keras.Model(inputs, outputs, name="vgg16_transfer")


def vgg16_base(model: keras.Model) -> keras.Model:
    """The VGG16 sub-model inside a model built by build_vgg16."""
    return next(layer for layer in model.layers if isinstance(layer, keras.Model))


def unfreeze_top_block(model: keras.Model) -> None:
    """Make the last convolutional block of the VGG16 base trainable (for fine-tuning)."""
    base = vgg16_base(model)
    base.trainable = True
    for layer in base.layers:
        layer.trainable = layer.name.startswith(VGG16_TOP_BLOCK)
