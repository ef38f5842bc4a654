"""A case's inputs: finding cases and their modalities, canonical geometry, preprocessing and its inverse, the
input checks and the modality classifier. Imports: numpy, scipy, nibabel.orientations; `core`, `io`, `artifacts`.
"""
