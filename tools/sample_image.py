"""Draw examples/sample.jpg, the picture the README's examples send: a house on a hill under the sun.

Made by this project (no third-party content), so it is free to use (CC0). Run from the repository root:
`python tools/sample_image.py`; the output is deterministic.
"""

from PIL import Image, ImageDraw

W, H = 640, 480


def draw() -> Image.Image:
    img = Image.new("RGB", (W, H))
    d = ImageDraw.Draw(img)
    for y in range(H):  # sky, light towards the horizon
        t = y / H
        d.line([(0, y), (W, y)], fill=(int(70 + 120 * t), int(130 + 90 * t), int(210 + 35 * t)))
    d.ellipse([480, 50, 580, 150], fill=(255, 214, 60))  # the sun
    d.ellipse([-200, 300, 840, 820], fill=(70, 150, 60))  # a green hill
    d.rectangle([240, 250, 400, 370], fill=(235, 225, 205), outline=(90, 70, 50), width=3)  # the house
    d.polygon([(225, 255), (320, 175), (415, 255)], fill=(180, 40, 35))  # its red roof
    d.rectangle([300, 305, 340, 370], fill=(110, 70, 40))  # the door
    d.rectangle([255, 275, 290, 305], fill=(150, 200, 240), outline=(90, 70, 50), width=2)  # windows
    d.rectangle([350, 275, 385, 305], fill=(150, 200, 240), outline=(90, 70, 50), width=2)
    d.rectangle([470, 290, 490, 370], fill=(100, 65, 35))  # a tree
    d.ellipse([440, 220, 520, 310], fill=(40, 110, 45))
    return img


if __name__ == "__main__":
    draw().save("examples/sample.jpg", quality=85)
