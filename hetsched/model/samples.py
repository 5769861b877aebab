"""Built-in sample images: the typical camera frame the profiler times decoding on, and the demo's
frames (the same size and kind, so the demo's limit counts the work its frames really need)."""

from __future__ import annotations

CAMERA_SIZE = (640, 480)


def sample_jpeg(seed: int = 7, width: int = CAMERA_SIZE[0], height: int = CAMERA_SIZE[1]) -> bytes:
    """A photo-like JPEG (smooth gradients + noise, quality 90) of a typical camera-frame size."""
    import io

    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    phase = seed * 37
    img = np.stack([(xx + phase) * 255 // width % 256, (yy + phase) * 255 // height % 256,
                    (xx + yy) * 255 // (width + height)], -1)
    img = (img + rng.normal(0, 12, img.shape)).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()
