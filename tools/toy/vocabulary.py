"""The small English vocabulary shared by the tiny tokenizer and the synthetic Pick-a-Pic captions."""

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
# RGB of each colour name, used by the toy preference world (the image whose colour matches wins)
COLOUR_RGB = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 220, 50),
    "purple": (140, 50, 180),
    "orange": (240, 140, 30),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
SUBJECTS = [
    "cat",
    "dog",
    "house",
    "tree",
    "car",
    "robot",
    "castle",
    "flower",
    "bird",
    "ship",
    "mountain",
    "city",
]
STYLES = ["painting", "photo", "sketch", "render", "watercolor", "pixel", "art", "poster"]
ADJECTIVES = [
    "beautiful",
    "tiny",
    "giant",
    "ancient",
    "futuristic",
    "cozy",
    "dark",
    "bright",
    "detailed",
    "cinematic",
]
GLUE = [
    "a",
    "an",
    "the",
    "of",
    "in",
    "on",
    "with",
    "and",
    "at",
    "night",
    "day",
    "style",
    "high",
    "quality",
    "8k",
]

WORDS = sorted(set(COLOURS + SUBJECTS + STYLES + ADJECTIVES + GLUE))
