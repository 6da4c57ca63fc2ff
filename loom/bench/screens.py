"""Synthetic phone screenshots for the `phone-agent` workload, drawn locally with Pillow (nothing is
downloaded): a status bar, an app bar, a grid of icons or a list of rows, and text, different at every
step of every session (so a fresh screenshot is never a cache hit by content), PNG-encoded as a data URL
the way Open-AutoGLM's client sends one."""

from __future__ import annotations

import base64
import io
import random

from PIL import Image, ImageDraw

PALETTE = [(66, 133, 244), (219, 68, 55), (244, 180, 0), (15, 157, 88), (171, 71, 188), (0, 172, 193)]


def screenshot(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    im = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(im)
    unit = max(8, width // 30)
    draw.rectangle([0, 0, width, 2 * unit], fill=(30, 30, 30))  # status bar
    draw.text((unit, unit // 2), f"{rng.randrange(24):02d}:{rng.randrange(60):02d}", fill=(255, 255, 255))
    bar = rng.choice(PALETTE)
    draw.rectangle([0, 2 * unit, width, 6 * unit], fill=bar)  # app bar
    draw.text((unit, 3 * unit), f"App {rng.randrange(1000)}", fill=(255, 255, 255))
    y = 7 * unit
    if rng.random() < 0.5:  # icon grid
        cell = width // 4
        for row in range((height - y) // cell):
            for col in range(4):
                x0, y0 = col * cell + unit, y + row * cell + unit
                draw.rounded_rectangle(
                    [x0, y0, x0 + cell - 2 * unit, y0 + cell - 3 * unit],
                    2 * unit // 3,
                    fill=rng.choice(PALETTE),
                )
                draw.text((x0, y0 + cell - 3 * unit + 4), f"app{rng.randrange(100)}", fill=(40, 40, 40))
    else:  # list of rows
        row_h = 5 * unit
        for row in range((height - y) // row_h):
            y0 = y + row * row_h
            draw.ellipse([unit, y0 + unit, 4 * unit, y0 + 4 * unit], fill=rng.choice(PALETTE))
            draw.text(
                (5 * unit, y0 + unit),
                f"Item {rng.randrange(10_000)} - {rng.randrange(100)} messages",
                fill=(20, 20, 20),
            )
            draw.line([unit, y0 + row_h - 1, width - unit, y0 + row_h - 1], fill=(220, 220, 220))
    return im


def data_url(im: Image.Image) -> str:
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
