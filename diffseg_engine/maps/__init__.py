"""A case's maps from its ensemble: mean, variance, the cleaned mask, entropy, member counts, the overview
picture, the QU-BraTS maps and every output file's name. Imports: numpy, scipy, matplotlib; `core`, `io`,
`artifacts`, `inputs`.
"""
