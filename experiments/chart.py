"""Line charts drawn with Pillow (the experiments' plots; matplotlib is not a dependency).

    chart(path, panels): panels = [{"title", "x_label", "x_log": bool,
                                    "series": [{"name", "x": [...], "y": [...], "lo": [...], "hi": [...]}]}]
lo/hi (optional) draw a vertical bar at each point: the spread over seeds; "x_names" (optional) names
categories placed at x = 0, 1, 2, ...
"""
import math

from PIL import Image, ImageDraw, ImageFont

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]
W, H, PAD = 420, 320, 52  # one panel, and its margin for the axes' labels


def _ticks(lo: float, hi: float, n: int = 5) -> list:
    """About n round numbers spanning [lo, hi]."""
    step = 10 ** math.floor(math.log10((hi - lo) / n or 1))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _panel(draw, x0: int, p: dict, font):
    xs = [math.log10(x) if p.get("x_log") else x for s in p["series"] for x in s["x"]]
    ys = [y for s in p["series"] for y in s["y"] + s.get("lo", []) + s.get("hi", [])]
    ylo, yhi = min(ys), max(ys)
    ylo, yhi = (ylo - 0.05 * (yhi - ylo or 1), yhi + 0.05 * (yhi - ylo or 1))
    xlo, xhi = min(xs), max(xs)
    xlo, xhi = (xlo - 0.05 * (xhi - xlo or 1), xhi + 0.05 * (xhi - xlo or 1))
    left, top, right, bottom = x0 + PAD, 44, x0 + W - 12, H - PAD + 8

    def at(x, y):  # data -> pixels
        u = math.log10(x) if p.get("x_log") else x
        return left + (u - xlo) / (xhi - xlo) * (right - left), bottom - (y - ylo) / (yhi - ylo) * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, 8), p["title"], fill=(0, 0, 0), font=font)
    for y in _ticks(ylo, yhi):
        v = bottom - (y - ylo) / (yhi - ylo) * (bottom - top)
        draw.line([left - 4, v, left, v], fill=(0, 0, 0))
        draw.text((x0 + 4, v - 6), f"{y:g}", fill=(0, 0, 0), font=font)
    xt = sorted({x for s in p["series"] for x in s["x"]})
    for x in xt:
        u = at(x, ylo)[0]
        draw.line([u, bottom, u, bottom + 4], fill=(0, 0, 0))
        name = p["x_names"][int(x)] if "x_names" in p else f"{x:g}"  # categories at x = 0, 1, ...
        draw.text((u - 3 * len(name), bottom + 6), name, fill=(0, 0, 0), font=font)
    draw.text((left, H - 18), p["x_label"], fill=(0, 0, 0), font=font)
    for k, s in enumerate(p["series"]):
        c = COLOURS[k % len(COLOURS)]
        line = [at(x, y) for x, y in zip(s["x"], s["y"])]
        if len(line) > 1:
            draw.line(line, fill=c, width=2)
        for i, (u, v) in enumerate(line):
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=c)
            if "lo" in s:
                draw.line([at(s["x"][i], s["lo"][i]), at(s["x"][i], s["hi"][i])], fill=c, width=1)
        legend_x = left + sum(len(t["name"]) * 6 + 16 for t in p["series"][:k])
        draw.text((legend_x, 24), s["name"], fill=c, font=font)  # the legend, one line above the plot


def chart(path, panels: list):
    """Panels side by side in one PNG."""
    img = Image.new("RGB", (W * len(panels), H), "white")
    draw, font = ImageDraw.Draw(img), ImageFont.load_default()
    for k, p in enumerate(panels):
        _panel(draw, k * W, p, font)
    img.save(path)
