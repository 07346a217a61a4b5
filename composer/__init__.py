"""Zoo Composer: stitch a family of pretrained timm models into a speed/accuracy curve (SN-Net).

`composer.load_stitched(folder)` loads a stitch exported by `python -m composer export`.
"""


def __getattr__(name: str):
    # Lazy, so that `import composer` (and the CLI's start) does not import torch and timm.
    if name == "load_stitched":
        from composer.export import load_stitched
        return load_stitched
    raise AttributeError(f"module 'composer' has no attribute '{name}'")
