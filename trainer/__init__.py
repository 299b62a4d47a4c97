"""The training package shipped to the box: `python -m trainer {scratch,vgg16} --data --out`.

Only the standard library, numpy, tensorflow, keras and pillow; nothing else of dlbox.
"""
