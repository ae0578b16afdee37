"""Training data: a concept's images and captions read from a folder (:mod:`.dataset`), and the caption
rules every front end shares (:mod:`.captions`). Pillow and numpy, no model code.
"""
